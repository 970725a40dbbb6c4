"""diffusers: a pipeline whose models are saved as flashpack files and loaded back in one call.

A tiny UNet and a DDPM scheduler stand in for a real pipeline (no download). The UNet is
written as unet/config.json + unet/model.flashpack; the scheduler as usual.

    python examples/diffusers_example.py [--device cuda]
"""

import argparse
import os
import tempfile

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from flashpack_ops.integrations.diffusers import FlashPackDiffusionPipeline


class FlashDDPMPipeline(DDPMPipeline, FlashPackDiffusionPipeline):
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = parser.parse_args().device

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    pipeline = FlashDDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))

    with tempfile.TemporaryDirectory() as directory:
        pipeline.save_pretrained_flashpack(directory)
        for root, _, files in sorted(os.walk(directory)):
            print(f"  {os.path.relpath(root, directory)}/: {sorted(files)}")

        loaded = FlashDDPMPipeline.from_pretrained_flashpack(directory, device=device)
        for p in (pipeline, loaded):
            p.set_progress_bar_config(disable=True)
        pipeline.to(device)
        images = [p(generator=torch.Generator().manual_seed(1), num_inference_steps=4, output_type="np").images
                  for p in (pipeline, loaded)]
        same = np.array_equal(images[0], images[1])
        print(f"loaded {type(loaded).__name__} onto {device}; images {images[1].shape} identical: {same}")
        assert same


if __name__ == "__main__":
    main()
