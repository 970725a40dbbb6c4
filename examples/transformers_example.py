"""transformers: save a model as config.json + model.flashpack, load it back with from_pretrained_flashpack.

A tiny Llama is built from a config so the example needs no download; a real checkpoint
directory works the same (or convert one first: `flashpack convert ./Llama-dir`).

    python examples/transformers_example.py [--device cuda]
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import flashpack_ops as flashpack
from flashpack_ops.integrations.transformers import FlashPackTransformersModelMixin


class FlashLlama(LlamaForCausalLM, FlashPackTransformersModelMixin):
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = parser.parse_args().device

    config = LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = FlashLlama(config).eval()
    prompt = torch.tensor([[1, 17, 42, 99]])

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained_flashpack(directory)

        loaded = FlashLlama.from_pretrained_flashpack(directory, device=device)
        print(f"loaded {type(loaded).__name__} onto {device}; "
              f"lm_head tied to embeddings: {loaded.lm_head.weight is loaded.model.embed_tokens.weight}")

        # Any transformers model class works without a subclass once the integrations are patched in.
        flashpack.patch_integrations()
        auto = AutoModelForCausalLM.from_pretrained_flashpack(directory, device=device, torch_dtype=torch.bfloat16)
        print(f"AutoModelForCausalLM -> {type(auto).__name__} in {auto.dtype}")

        with torch.no_grad():
            expected = model(prompt).logits
            got = loaded(prompt.to(device)).logits.cpu()
        same = torch.equal(got, expected) if device == "cpu" else torch.allclose(got, expected, atol=1e-4)
        print(f"logits match: {same}")
        assert same
        tokens = loaded.generate(prompt.to(device), max_new_tokens=5, do_sample=False)
        print(f"greedy continuation: {tokens[0, prompt.shape[1]:].tolist()}")


if __name__ == "__main__":
    main()
