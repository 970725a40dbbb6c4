"""Integrity: checksums written at save time, checked by verify_file and load(verify=True)."""

import json
import math
import os
import re
import struct
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

import flashpack_ops
from conftest import STORABLE_DTYPES, assert_same, assert_same_dict, random_tensor
from flashpack_ops import load_file, read_metadata, save_file, verify_file

CHUNK = 16 << 20


def crc32c_reference(data: bytes) -> int:
    """CRC-32C straight from its definition, for small inputs."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def every_kind():
    """One tensor of every storable dtype (one block each), plus empty, scalar, tied and
    non-contiguous ones."""
    sd = {f"t_{str(dtype)[6:]}": random_tensor((3, 11), dtype, seed=k) for k, dtype in enumerate(STORABLE_DTYPES)}
    sd["empty"] = torch.empty(0, 4)
    sd["empty_int"] = torch.empty(0, dtype=torch.int32)
    sd["scalar"] = torch.tensor(2.5)
    sd["transposed"] = torch.randn(6, 9).t()  # written through a conversion
    sd["tied"] = sd["t_float32"]
    return sd


def rewrite_footer(src, dst, edit):
    """Copies a flashpack file with its footer passed through edit(meta)."""
    with open(src, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[-16:-8], "little")
    meta = json.loads(raw[-16 - n:-16])
    edit(meta)
    footer = json.dumps(meta, separators=(",", ":")).encode()
    with open(dst, "wb") as f:
        f.write(raw[:-16 - n] + footer + len(footer).to_bytes(8, "little") + b"FLASHPK\0")


@contextmanager
def flipped(path, pos):
    """One bit of the byte at `pos` flipped for the duration of the block."""
    def flip():
        with open(path, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ 0x10]))
    flip()
    try:
        yield
    finally:
        flip()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A float32 block of three checksum chunks (two full, one partial), a bfloat16 block,
    an int8 block, and a tensor that crosses a chunk boundary."""
    path = str(tmp_path_factory.mktemp("integrity") / "big.flashpack")
    g = torch.Generator().manual_seed(1)
    sd = {
        "a": torch.randn(5_000_001, generator=g),  # 20,000,004 bytes: crosses chunk 0 -> 1
        "b": torch.randn(3_388_609, generator=g),
        "c": torch.randn(100, generator=g),
        "h": torch.randn(4099, generator=g).bfloat16(),
        "i": torch.randint(-128, 128, (3,), generator=g).to(torch.int8),
    }
    save_file(sd, path, checksum=True)
    return path, sd


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("copy", [False, True], ids=["mapped", "copied"])
def test_round_trip_every_kind_with_checksums(tmp_path, copy):
    sd = every_kind()
    path = str(tmp_path / "kinds.flashpack")
    save_file(sd, path, checksum=True)
    verify_file(path)
    got = load_file(path, copy=copy, verify=True)
    assert_same_dict(got, sd)
    assert got["tied"].data_ptr() == got["t_float32"].data_ptr()


def test_every_block_carries_one_checksum_per_chunk(big):
    path, _ = big
    for block in read_metadata(path)["macroblocks"]:
        assert block["checksum"] == "crc32c"
        assert block["checksum_chunk_bytes"] == CHUNK
        assert len(block["checksums"]) == math.ceil(block["length_bytes"] / CHUNK)
    assert len(read_metadata(path)["macroblocks"][0]["checksums"]) == 3


def test_multi_chunk_round_trip(big):
    path, sd = big
    verify_file(path)
    verify_file(path, num_threads=1)
    for copy in (False, True):
        got = load_file(path, copy=copy, verify=True)
        for name, t in sd.items():
            assert torch.equal(got[name], t), name


def test_empty_blocks_have_no_chunks(tmp_path):
    path = str(tmp_path / "empty.flashpack")
    save_file({"e": torch.empty(0, 3), "x": torch.ones(2, dtype=torch.int64)}, path, checksum=True)
    blocks = read_metadata(path)["macroblocks"]
    assert blocks[0]["length_bytes"] == 0 and blocks[0]["checksums"] == []
    verify_file(path)
    assert load_file(path, verify=True)["e"].shape == (0, 3)


def test_checksums_do_not_depend_on_thread_count(tmp_path):
    sd = every_kind()
    sd["big"] = torch.arange(6_000_000, dtype=torch.int32)  # several write tasks per chunk
    one, many = str(tmp_path / "one.flashpack"), str(tmp_path / "many.flashpack")
    save_file(sd, one, checksum=True, num_threads=1)
    save_file(sd, many, checksum=True, num_threads=4)
    with open(one, "rb") as f1, open(many, "rb") as f2:
        assert f1.read() == f2.read()


def test_pack_to_file_stores_checksums(tmp_path):
    path = str(tmp_path / "packed.flashpack")
    flashpack_ops.pack_to_file({"w": torch.ones(3)}, path, checksum=True)
    verify_file(path)


# ---------------------------------------------------------------- the checksum itself


def test_checksum_is_standard_crc32c(tmp_path):
    path = str(tmp_path / "vector.flashpack")
    save_file({"v": torch.frombuffer(bytearray(b"123456789"), dtype=torch.uint8)}, path, checksum=True)
    assert read_metadata(path)["macroblocks"][0]["checksums"] == [0xE3069283]


def test_checksums_match_the_definition_for_every_block(tmp_path):
    path = str(tmp_path / "kinds.flashpack")
    save_file(every_kind(), path, checksum=True)
    with open(path, "rb") as f:
        raw = f.read()
    for block in read_metadata(path)["macroblocks"]:
        data = raw[block["offset_bytes"]:block["offset_bytes"] + block["length_bytes"]]
        want = [crc32c_reference(data)] if data else []
        assert block["checksums"] == want, block["dtype"]


def test_checksums_of_converted_tensors(tmp_path):
    path = str(tmp_path / "converted.flashpack")
    save_file({"a": torch.randn(300, 7).t(), "b": torch.arange(50)}, path, checksum=True, target_dtype=torch.float16,
              floating_only=False)
    with open(path, "rb") as f:
        raw = f.read()
    (block,) = read_metadata(path)["macroblocks"]
    assert block["checksums"] == [crc32c_reference(raw[block["offset_bytes"]:][:block["length_bytes"]])]
    verify_file(path)


def test_portable_code_gives_the_same_checksums(tmp_path, big):
    # The table-driven CRC (CPUs without SSE4.2) in a separate process: it must verify a file
    # checksummed by the hardware instruction, and write checksums this process accepts.
    path, _ = big
    out = str(tmp_path / "portable.flashpack")
    script = (
        "import torch, flashpack_ops as fp, sys\n"
        "fp.verify_file(sys.argv[1])\n"
        "g = torch.Generator().manual_seed(3)\n"
        "fp.save_file({'x': torch.randn(4_500_001, generator=g), 'y': torch.arange(9, dtype=torch.int8)},"
        " sys.argv[2], checksum=True)\n"
    )
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(flashpack_ops.__file__)))
    env = dict(os.environ, FLASHPACK_CRC32C_PORTABLE="1",
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-c", script, path, out], env=env, check=True)
    verify_file(out)


# ---------------------------------------------------------------- corruption is found


def positions(path):
    """(label, byte position, block index, chunk index) of bytes worth corrupting."""
    blocks = read_metadata(path)["macroblocks"]
    first, last = blocks[0], blocks[-1]
    return [
        ("first_payload_byte", first["offset_bytes"], 0, 0),
        ("last_byte_of_first_chunk", first["offset_bytes"] + CHUNK - 1, 0, 0),
        ("middle_chunk", first["offset_bytes"] + CHUNK + 12345, 0, 1),
        ("alignment_padding_inside_block", first["offset_bytes"] + 20_000_010, 0, 1),
        ("last_byte_of_block", first["offset_bytes"] + first["length_bytes"] - 1, 0, 2),
        ("first_byte_of_small_block", blocks[1]["offset_bytes"], 1, 0),
        ("last_byte_of_last_block", last["offset_bytes"] + last["length_bytes"] - 1, len(blocks) - 1, 0),
    ]


POSITION_LABELS = ["first_payload_byte", "last_byte_of_first_chunk", "middle_chunk",
                   "alignment_padding_inside_block", "last_byte_of_block", "first_byte_of_small_block",
                   "last_byte_of_last_block"]


@pytest.mark.parametrize("label", POSITION_LABELS)
def test_one_flipped_byte_is_found(big, label):
    path, _ = big
    (pos, block, chunk), = [(p, b, c) for lbl, p, b, c in positions(path) if lbl == label]
    spec = read_metadata(path)["macroblocks"][block]
    lo = spec["offset_bytes"] + chunk * CHUNK
    hi = min(lo + CHUNK, spec["offset_bytes"] + spec["length_bytes"])
    where = rf"checksum mismatch in macroblock {block} \({spec['dtype']}\): file bytes \[{lo}, {hi}\) \(chunk {chunk}"
    with flipped(path, pos):
        with pytest.raises(ValueError, match=rf"flashpack::verify: '{re.escape(path)}': {where}"):
            verify_file(path)
        with pytest.raises(ValueError, match=rf"flashpack::load: '{re.escape(path)}': {where}"):
            load_file(path, verify=True)
        with pytest.raises(ValueError, match=where):
            load_file(path, copy=True, verify=True)
        with pytest.raises(ValueError, match=where):
            torch.ops.flashpack.load_list(path, verify=True)
        # Without verify nothing is checked: the load is as fast as ever.
        load_file(path, copy=True)
    verify_file(path)


def test_error_names_the_tensors_in_the_range(big):
    path, _ = big
    start = read_metadata(path)["macroblocks"][0]["offset_bytes"]
    with flipped(path, start + CHUNK + 100):
        with pytest.raises(ValueError, match=r"the range holds 'a', 'b'\. The file is corrupt"):
            verify_file(path)


def test_error_counts_every_bad_chunk(big):
    path, _ = big
    start = read_metadata(path)["macroblocks"][0]["offset_bytes"]
    with flipped(path, start + 5), flipped(path, start + 2 * CHUNK + 5):
        with pytest.raises(ValueError, match=r"chunk 0 of the block.*; 2 of 5 chunks differ"):
            verify_file(path)


def test_scripted_verify_is_not_optimized_away(big):
    path, _ = big

    @torch.jit.script
    def check(p: str) -> int:
        torch.ops.flashpack.verify(p)
        return 1

    start = read_metadata(path)["macroblocks"][0]["offset_bytes"]
    with flipped(path, start):
        with pytest.raises(Exception, match="checksum mismatch"):
            check(path)


# ---------------------------------------------------------------- files without checksums


def test_file_without_checksums_loads_and_says_nothing_to_verify(tmp_path):
    sd = every_kind()
    path = str(tmp_path / "plain.flashpack")
    save_file(sd, path)
    assert "checksums" not in read_metadata(path)["macroblocks"][0]
    assert_same_dict(load_file(path), sd)
    msg = r"nothing to verify: no checksums were stored in this flashpack_v4 file; save it with checksum=True"
    with pytest.raises(ValueError, match=msg):
        verify_file(path)
    with pytest.raises(ValueError, match=msg):
        load_file(path, verify=True)


def test_reference_file_says_nothing_to_verify(tmp_path):
    from flashpack import pack_to_file as reference_pack
    path = str(tmp_path / "ref.flashpack")
    reference_pack({"w": torch.randn(10), "i": torch.arange(4)}, path, target_dtype=None, num_workers=1)
    with pytest.raises(ValueError, match="no checksums were stored"):
        verify_file(path)


def test_reference_reader_loads_a_checksummed_file(tmp_path):
    from flashpack.deserialization import iterate_from_flash_tensor, read_flashpack_file
    g = torch.Generator().manual_seed(2)
    sd = {"w": torch.randn(1000, generator=g), "h": torch.randn(77, generator=g).half(),
          "b": torch.randn(33, generator=g).bfloat16(), "i": torch.arange(5), "e": torch.empty(0)}
    path = str(tmp_path / "checked.flashpack")
    save_file(sd, path, checksum=True)
    storage, meta = read_flashpack_file(path)
    got = dict(iterate_from_flash_tensor(storage, meta))
    for name in ("w", "h", "b", "i"):
        assert torch.equal(got[name], sd[name]), name


# ---------------------------------------------------------------- damaged checksum keys


@pytest.fixture
def small(tmp_path):
    path = str(tmp_path / "small.flashpack")
    save_file({"w": torch.randn(1000), "i": torch.arange(10)}, path, checksum=True)
    return path


def edit_block0(**changes):
    def edit(meta):
        for key, value in changes.items():
            if value is None:
                del meta["macroblocks"][0][key]
            else:
                meta["macroblocks"][0][key] = value
    return edit


@pytest.mark.parametrize("edit,error", [
    (edit_block0(checksums=[]), r"macroblock 0 has 0 checksums but its 4000 bytes in chunks of 16777216 need 1"),
    (edit_block0(checksums=[1, 2]), r"macroblock 0 has 2 checksums but its 4000 bytes .* need 1"),
    (edit_block0(checksums=["1a2b"]), r"macroblock 0: checksums\[0\] must be an integer from 0 to 4294967295"),
    (edit_block0(checksums=[1.5]), r"macroblock 0: checksums\[0\] must be an integer from 0 to 4294967295"),
    (edit_block0(checksums=[-1]), r"macroblock 0: checksums\[0\] must be an integer from 0 to 4294967295"),
    (edit_block0(checksums=[2**32]), r"macroblock 0: checksums\[0\] must be an integer from 0 to 4294967295"),
    (edit_block0(checksums={}), r"macroblock 0: \"checksums\" must be an array"),
    (edit_block0(checksums=None), r"macroblock 0 has only some of \"checksum\", \"checksum_chunk_bytes\" and "
                                  r"\"checksums\" \(all three or none\)"),
    (edit_block0(checksum=None), r"macroblock 0 has only some of"),
    (edit_block0(checksum_chunk_bytes=None), r"macroblock 0 has only some of"),
    (edit_block0(checksum=7), r"macroblock 0: \"checksum\" must be a non-empty string"),
    (edit_block0(checksum_chunk_bytes=0), r"macroblock 0: \"checksum_chunk_bytes\" is 0, less than the smallest "
                                          r"allowed, 4096"),
    (edit_block0(checksum_chunk_bytes="16M"), r"macroblock 0: \"checksum_chunk_bytes\" must be an integer"),
    # One chunk record per byte would make a small footer cost a verify millions of reads.
    (edit_block0(checksum_chunk_bytes=1, checksums=[0] * 4000), r"macroblock 0: \"checksum_chunk_bytes\" is 1, less "
                                                                r"than the smallest allowed, 4096"),
], ids=["none", "one_too_many", "string", "float", "negative", "too_large", "not_an_array", "no_checksums",
        "no_algorithm", "no_chunk_size", "algorithm_not_a_string", "zero_chunk", "chunk_not_an_integer",
        "tiny_chunk"])
def test_damaged_checksum_keys_are_clear_errors(small, tmp_path, edit, error):
    bad = str(tmp_path / "bad.flashpack")
    rewrite_footer(small, bad, edit)
    with pytest.raises(ValueError, match=rf"flashpack::load: '{re.escape(bad)}': {error}"):
        load_file(bad)
    with pytest.raises(ValueError, match=error):
        read_metadata(bad)
    with pytest.raises(ValueError, match=error):
        verify_file(bad)


def test_wrong_checksum_value_is_a_mismatch(small, tmp_path):
    bad = str(tmp_path / "bad.flashpack")
    rewrite_footer(small, bad, lambda m: m["macroblocks"][1]["checksums"].__setitem__(0, 12345))
    load_file(bad)  # the footer is well-formed
    with pytest.raises(ValueError, match=r"macroblock 1 \(int64\).*the footer says 0x00003039"):
        verify_file(bad)


def test_unknown_algorithm_loads_but_cannot_be_verified(small, tmp_path):
    bad = str(tmp_path / "future.flashpack")
    rewrite_footer(small, bad, edit_block0(checksum="xxh3", checksums=["00ff"]))
    assert torch.equal(load_file(bad)["i"], torch.arange(10))
    with pytest.raises(ValueError, match=r"macroblock 0 \(float32\) uses checksum algorithm 'xxh3', which this "
                                         r"version of flashpack_ops cannot check \(it knows crc32c\)"):
        verify_file(bad)


def test_checksums_on_some_blocks_only(small, tmp_path):
    bad = str(tmp_path / "partial.flashpack")
    rewrite_footer(small, bad, edit_block0(checksum=None, checksum_chunk_bytes=None, checksums=None))
    load_file(bad)
    with pytest.raises(ValueError, match=r"macroblock 0 \(float32\) has no checksums while other blocks do"):
        verify_file(bad)


# ---------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_verifies_on_the_host(big):
    if not flashpack_ops.has_cuda():
        pytest.skip("flashpack_ops was built without CUDA")
    path, sd = big
    got = load_file(path, "cuda", verify=True)
    assert got["a"].is_cuda
    for name, t in sd.items():
        assert torch.equal(got[name].cpu(), t), name
    start = read_metadata(path)["macroblocks"][0]["offset_bytes"]
    with flipped(path, start + CHUNK + 7):
        with pytest.raises(ValueError, match=r"flashpack::load: .*checksum mismatch in macroblock 0 \(float32\)"):
            load_file(path, "cuda", verify=True)


def test_a_damaged_footer_never_verifies_as_other_tensors(tmp_path):
    # The block checksums cover the bytes; a flipped bit in a name, an offset or a
    # "macroblock" key points at other bytes (or renames a tensor) with every one of them
    # passing: the index has its own checksum. Each flip must fail or load the saved tensors.
    path = tmp_path / "checked.flashpack"
    saved = {"w": torch.randn(3, 5), "b": torch.randn(3), "i": torch.arange(6, dtype=torch.int64)}
    save_file(saved, path, checksum=True)
    data = path.read_bytes()
    (footer_len,) = struct.unpack("<Q", data[-16:-8])
    start = len(data) - 16 - footer_len
    damaged = tmp_path / "damaged.flashpack"
    loaded_ok = 0
    for pos in range(start, len(data)):
        for bit in (0, 5):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            damaged.write_bytes(bytes(flipped))
            try:
                got = load_file(damaged, verify=True)
            except (ValueError, RuntimeError):
                continue
            assert list(got) == list(saved), f"byte {pos - start} of the footer, bit {bit}"
            for name, tensor in saved.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (pos - start, bit, name)
            loaded_ok += 1
    assert loaded_ok > 0  # whitespace and the like: flips that change nothing still load
