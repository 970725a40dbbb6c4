"""Hostile and broken files: each gives a clear exception naming the file and the problem."""

import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

import flashpack_ops

MAGIC = b"FLASHPK\0"


def write_raw(path, payload: bytes, footer, *, footer_len=None, magic=MAGIC):
    """Writes a file by hand: payload, footer (a dict, str or bytes), length, magic."""
    if isinstance(footer, dict):
        footer = json.dumps(footer)
    if isinstance(footer, str):
        footer = footer.encode("utf-8")
    with open(path, "wb") as f:
        f.write(payload)
        f.write(footer)
        f.write(struct.pack("<Q", len(footer) if footer_len is None else footer_len))
        f.write(magic)
    return str(path)


def v4(index, macroblocks, **extra):
    meta = {"format": "flashpack_v4", "align_bytes": 128, "total_payload_bytes": 64, "total_elems": 16,
            "macroblocks": macroblocks, "index": index}
    meta.update(extra)
    return meta


GOOD_BLOCK = {"dtype": "float32", "offset_bytes": 0, "length_bytes": 64, "length_elems": 16}
GOOD_ENTRY = {"name": "w", "shape": [4, 4], "offset": 0, "length": 16, "macroblock": 0}


def expect_error(path, pattern, exc=ValueError):
    """Both entry points raise `exc` with a message naming the file and matching `pattern`."""
    for load in (lambda: torch.ops.flashpack.load(path, "cpu"), lambda: flashpack_ops.load_file(path),
                 lambda: flashpack_ops.read_metadata(path)):
        with pytest.raises(exc, match=pattern) as info:
            load()
        assert path in str(info.value)
    assert not flashpack_ops.is_flashpack_file(path)


def test_hand_written_file_loads(tmp_path):
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    path = write_raw(tmp_path / "ok.flashpack", payload, v4([GOOD_ENTRY], [GOOD_BLOCK]))
    assert torch.equal(flashpack_ops.load_file(path)["w"], torch.arange(16.0).reshape(4, 4))


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.flashpack")
    with pytest.raises(FileNotFoundError, match="nope.flashpack"):
        flashpack_ops.load_file(path)
    with pytest.raises(RuntimeError, match=re.escape(path) + ".*No such file"):
        torch.ops.flashpack.load(path, "cpu")


def test_directory(tmp_path):
    with pytest.raises(RuntimeError, match="is a directory"):
        flashpack_ops.load_file(tmp_path)


@pytest.mark.parametrize("size", [0, 1, 15])
def test_too_small(tmp_path, size):
    path = str(tmp_path / "small.flashpack")
    open(path, "wb").write(b"\0" * size)
    expect_error(path, "too small")


def test_bad_magic(tmp_path):
    path = write_raw(tmp_path / "m.flashpack", b"", v4([], []), magic=b"SAFETENS")
    expect_error(path, "magic")


def test_a_safetensors_file_is_not_a_flashpack_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    path = str(tmp_path / "model.safetensors")
    safetensors.save_file({"a": torch.ones(3)}, path)
    expect_error(path, "not a flashpack file .*; it looks like a safetensors file; convert it with `flashpack convert`")


def test_a_torch_save_file_is_not_a_flashpack_file(tmp_path):
    path = str(tmp_path / "model.pt")
    torch.save({"a": torch.ones(3)}, path)
    expect_error(path, "not a flashpack file .*; it looks like a torch.save file")


@pytest.mark.parametrize("footer_len", [10**6, 2**40, 2**63, 2**64 - 1])
def test_lying_footer_length(tmp_path, footer_len):
    path = write_raw(tmp_path / "len.flashpack", b"x" * 100, v4([], []), footer_len=footer_len)
    expect_error(path, "footer length .* larger than the file")


@pytest.mark.parametrize("footer", [
    b"", b"{", b"{\"format\": ", b"[1, 2", b"{\"a\": 1,}", b"{\"a\" 1}", b"nul", b"{} x", b"\xff\xfe",
    b"{\"format\": \"flashpack_v4\xff\"}", b"{\"a\": \"\x01\"}", b"{\"a\": 01}", b"{\"a\": \"\\ud800\"}",
    b"{\"a\": \"\\x\"}", b"{\"a\": -}", b"{\"a\": 1e}",
], ids=repr)
def test_broken_json(tmp_path, footer):
    path = write_raw(tmp_path / "json.flashpack", b"", footer)
    expect_error(path, "not valid JSON|not a JSON object")


@pytest.mark.parametrize("footer, pattern", [
    (b'{"a": [1 2]}', "at byte 9: expected ',' or '\\]' in an array"),
    (b'{"a": [1, 2', "at byte 11: unterminated array"),
    (b'{"a": [', "at byte 7: unterminated array"),
    (b'{"a": @}', "at byte 6: unexpected character '@'"),
    (b'{"a": \x01}', "at byte 6: unexpected character byte 0x01"),
    (b'{"a": ', "at byte 6: unexpected end of input"),
])
def test_broken_json_says_where_and_what(tmp_path, footer, pattern):
    path = write_raw(tmp_path / "json.flashpack", b"", footer)
    expect_error(path, "malformed JSON " + pattern)


@pytest.mark.parametrize("where", range(0, 19))
@pytest.mark.parametrize("bad, pattern", [
    (b"\x01", "at byte {}: control character in a string"),
    (b"\x7f\xff", "at byte {}: invalid UTF-8 lead byte"),
    (b"\xc3", "at byte {}: invalid UTF-8 continuation byte"),
    (b"\\q", "at byte {}: invalid escape character 'q'"),
], ids=["control", "lead", "continuation", "escape"])
def test_a_bad_byte_anywhere_in_a_string_is_found(tmp_path, where, bad, pattern):
    # Strings are scanned eight bytes at a time where they are plain: whatever its place in
    # a word, a byte that is not is read one at a time, and refused where it must be.
    name = b"a" * where + bad + b"bcdefghijklmnopq"
    footer = b'{"format": "flashpack_v4", "macroblocks": [], "index": [{"name": "' + name + b'"}]}'
    at = footer.index(name) + where + {b"\x7f": 1, b"\\": 2}.get(bad[:1], 0)
    path = write_raw(tmp_path / "s.flashpack", b"", footer)
    expect_error(path, "not valid JSON \\(malformed JSON " + pattern.format(at))


@pytest.mark.parametrize("where", range(0, 19))
@pytest.mark.parametrize("odd", ['"', "\\", "\n", "\u00e9", "\u4e2d", "\U0001f600", "/"])
def test_an_odd_character_anywhere_in_a_name_comes_back(tmp_file, where, odd):
    name = "a" * where + odd + "bcdefghijklmnopq"
    flashpack_ops.save_file({name: torch.arange(3), "after": torch.ones(2)}, tmp_file)
    assert list(flashpack_ops.load_file(tmp_file)) == [name, "after"]


@pytest.mark.parametrize("offset", [9, 10**17, 9 * 10**18, 10**19, 2**64 - 1, 2**64 + 5, 10**25])
def test_long_numbers_are_read_whole(tmp_path, offset):
    # Up to nineteen digits are read without an overflow check, more are checked digit by digit.
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    path = write_raw(tmp_path / "n.flashpack", payload, v4([dict(GOOD_ENTRY, offset=offset)], [GOOD_BLOCK]))
    if offset < 2**63:
        expect_error(path, f"ends at element {offset + 16}, past the end of macroblock 0")
    else:
        expect_error(path, "\"offset\" must be an integer")


@pytest.mark.parametrize("depth", [64, 1000, 200_000])
def test_deeply_nested_json_does_not_blow_the_stack(tmp_path, depth):
    # The object is one level, the arrays the rest.
    path = write_raw(tmp_path / "deep.flashpack", b"", '{"x": ' + "[" * depth + "]" * depth + "}")
    expect_error(path, "nesting deeper than 64")


def test_64_levels_of_nesting_parse(tmp_path):
    path = write_raw(tmp_path / "deep.flashpack", b"", '{"x": ' + "[" * 63 + "]" * 63 + "}")
    expect_error(path, "footer has no \"format\" field")


@pytest.mark.parametrize("footer", ["[]", "3", "\"flashpack_v4\"", "null"])
def test_footer_not_an_object(tmp_path, footer):
    expect_error(write_raw(tmp_path / "obj.flashpack", b"", footer), "not a JSON object")


def test_unknown_format(tmp_path):
    expect_error(write_raw(tmp_path / "f.flashpack", b"", {"format": "flashpack_v9", "index": []}),
                 "unknown format 'flashpack_v9'")


def test_missing_format(tmp_path):
    expect_error(write_raw(tmp_path / "f.flashpack", b"", {"index": []}), "no \"format\" field")


def test_unknown_dtype(tmp_path):
    block = dict(GOOD_BLOCK, dtype="float128")
    expect_error(write_raw(tmp_path / "d.flashpack", b"\0" * 64, v4([GOOD_ENTRY], [block])),
                 "macroblock 0: unknown dtype 'float128'")


@pytest.mark.parametrize("name, element_size, since", [("float8_e8m0fnu", 1, "2.7"), ("float4_e2m1fn_x2", 1, "2.8"),
                                                        ("bcomplex32", 4, "2.14")])
def test_a_dtype_newer_than_this_torch_names_the_torch_that_reads_it(tmp_path, name, element_size, since):
    # A file written with a newer torch than the one at hand: the torch that has the dtype
    # loads it, an older one says which release added it.
    payload = bytes(range(16 * element_size))
    block = dict(GOOD_BLOCK, dtype=name, length_bytes=len(payload))
    path = write_raw(tmp_path / "newer.flashpack", payload, v4([GOOD_ENTRY], [block], total_payload_bytes=len(payload)))
    if hasattr(torch, name):
        loaded = flashpack_ops.load_file(path)["w"]
        assert loaded.dtype == getattr(torch, name) and loaded.shape == (4, 4)
        assert bytes(loaded.view(torch.uint8).flatten().tolist()) == payload
    else:
        expect_error(path, rf"macroblock 0: dtype '{name}' needs torch {re.escape(since)} or newer \(this is torch ")


def test_quantized_dtype_name_is_unknown(tmp_path):
    block = dict(GOOD_BLOCK, dtype="qint8", length_bytes=16)
    expect_error(write_raw(tmp_path / "q.flashpack", b"\0" * 64, v4([GOOD_ENTRY], [block])), "unknown dtype 'qint8'")


@pytest.mark.parametrize("entry, pattern", [
    (dict(GOOD_ENTRY, offset=1), "index entry 'w' ends at element 17, past the end of macroblock 0 \\(16 elements\\)"),
    (dict(GOOD_ENTRY, offset=2**63 - 1, length=2**63 - 1, shape=[2**63 - 1]), "ends at element 18446744073709551614"),
    (dict(GOOD_ENTRY, offset=2**64 - 1), "\"offset\" must be an integer"),
    (dict(GOOD_ENTRY, shape=[4, -4]), "index entry 'w': \"shape\" is negative \\(-4\\)"),
    (dict(GOOD_ENTRY, shape=[4, 5]), "the shape holds 20 elements but \"length\" says 16"),
    (dict(GOOD_ENTRY, shape=[2**32, 2**32, 2]), "more than 2\\^64"),
    (dict(GOOD_ENTRY, shape=[0, 2**62, 4], length=0), "has shape \\[0, 4611686018427387904, 4\\], too large"),
    (dict(GOOD_ENTRY, shape=[1] * 65, length=1), "65 dimensions"),
    (dict(GOOD_ENTRY, shape=[4.0, 4]), "\"shape\" must be an integer"),
    (dict(GOOD_ENTRY, shape="4x4"), "\"shape\" must be an array"),
    (dict(GOOD_ENTRY, offset=-1), "\"offset\" is negative"),
    (dict(GOOD_ENTRY, offset="0"), "\"offset\" must be an integer"),
    (dict(GOOD_ENTRY, length=True), "\"length\" must be an integer"),
    (dict(GOOD_ENTRY, macroblock=1), "refers to macroblock 1 but the file has 1"),
    (dict(GOOD_ENTRY, macroblock=-1), "\"macroblock\" is negative"),
    (dict(GOOD_ENTRY, name=7), "index entry 0: \"name\" must be a string"),
    ({k: v for k, v in GOOD_ENTRY.items() if k != "shape"}, "index entry 'w' has no \"shape\" field"),
    ({k: v for k, v in GOOD_ENTRY.items() if k != "name"}, "index entry 0 has no \"name\" field"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
def test_bad_index_entries(tmp_path, entry, pattern):
    path = write_raw(tmp_path / "e.flashpack", b"\0" * 64, v4([entry], [GOOD_BLOCK]))
    expect_error(path, pattern)


def test_duplicate_names(tmp_path):
    path = write_raw(tmp_path / "dup.flashpack", b"\0" * 64, v4([GOOD_ENTRY, GOOD_ENTRY], [GOOD_BLOCK]))
    expect_error(path, "index entry 'w' appears twice")


def test_a_repeated_name_among_thousands(tmp_path):
    # 5,000 distinct names but one, repeated far from its first: the error names it.
    index = [dict(GOOD_ENTRY, name=f"layers.{k}.weight", shape=[0], offset=0, length=0) for k in range(5000)]
    index[4321]["name"] = "layers.1234.weight"
    path = write_raw(tmp_path / "dup.flashpack", b"\0" * 64, v4(index, [GOOD_BLOCK]))
    expect_error(path, "index entry 'layers.1234.weight' appears twice")
    del index[4321]
    path = write_raw(tmp_path / "distinct.flashpack", b"\0" * 64, v4(index, [GOOD_BLOCK]))
    assert list(flashpack_ops.load_file(path)) == [e["name"] for e in index]


@pytest.mark.parametrize("block, pattern", [
    (dict(GOOD_BLOCK, offset_bytes=4), "macroblock 0 \\(float32\\) ends past the payload end 64"),
    (dict(GOOD_BLOCK, offset_bytes=2), "offset_bytes 2 is not a multiple of the 4-byte element size"),
    (dict(GOOD_BLOCK, length_bytes=60), "length_bytes 60 does not equal length_elems 16 x 4 bytes"),
    (dict(GOOD_BLOCK, length_elems=2**62, length_bytes=0), "does not equal length_elems"),
    (dict(GOOD_BLOCK, offset_bytes=2**64 - 4), "\"offset_bytes\" must be an integer"),
    (dict(GOOD_BLOCK, offset_bytes=2**63 - 4, length_bytes=2**62, length_elems=2**60), "ends past the payload end"),
    (dict(GOOD_BLOCK, dtype=3), "\"dtype\" must be a string"),
    ({k: v for k, v in GOOD_BLOCK.items() if k != "length_elems"}, "macroblock 0 has no \"length_elems\" field"),
], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
def test_bad_macroblocks(tmp_path, block, pattern):
    path = write_raw(tmp_path / "b.flashpack", b"\0" * 64, v4([GOOD_ENTRY], [block]))
    expect_error(path, pattern)


def test_overlapping_macroblocks(tmp_path):
    # A copying load allocates every block: a small file listing one range many times over
    # must not cost many times its size.
    blocks = [dict(GOOD_BLOCK) for _ in range(100)]
    path = write_raw(tmp_path / "o.flashpack", b"\0" * 64, v4([GOOD_ENTRY], blocks))
    expect_error(path, "macroblocks [0-9]+ and [0-9]+ overlap \\(bytes 0-64 and 0-64\\); the footer is corrupt")
    halves = [dict(GOOD_BLOCK, length_bytes=48, length_elems=12),
              dict(GOOD_BLOCK, offset_bytes=32, length_bytes=32, length_elems=8)]
    path = write_raw(tmp_path / "p.flashpack", b"\0" * 64, v4([GOOD_ENTRY | {"length": 12, "shape": [12]}], halves))
    expect_error(path, "macroblocks 0 and 1 overlap \\(bytes 0-48 and 32-64\\)")


def test_adjacent_and_empty_macroblocks_are_not_overlaps(tmp_path):
    blocks = [dict(GOOD_BLOCK, length_bytes=32, length_elems=8), dict(GOOD_BLOCK, offset_bytes=32, length_bytes=32,
              length_elems=8), dict(GOOD_BLOCK, offset_bytes=16, length_bytes=0, length_elems=0)]
    entries = [dict(GOOD_ENTRY, shape=[8], length=8), dict(GOOD_ENTRY, name="v", shape=[8], length=8, macroblock=1),
               dict(GOOD_ENTRY, name="e", shape=[0], length=0, macroblock=2)]
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    loaded = flashpack_ops.load_file(write_raw(tmp_path / "a.flashpack", payload, v4(entries, blocks)), copy=True)
    assert torch.equal(loaded["v"], torch.arange(8.0, 16.0)) and loaded["e"].shape == (0,)


def test_v4_without_macroblocks(tmp_path):
    meta = v4([GOOD_ENTRY], [])
    del meta["macroblocks"]
    expect_error(write_raw(tmp_path / "nm.flashpack", b"\0" * 64, meta), "no \"macroblocks\" field")
    expect_error(write_raw(tmp_path / "nb.flashpack", b"\0" * 64, v4([GOOD_ENTRY], [])),
                 "refers to macroblock 0 but the file has 0")


def test_v3_payload_truncated(tmp_path):
    meta = {"format": "flashpack_v3", "target_dtype": "bfloat16", "align_bytes": 128, "total_elems": 1000,
            "index": [{"name": "w", "shape": [1000], "offset": 0, "length": 1000}]}
    expect_error(write_raw(tmp_path / "v3.flashpack", b"\0" * 1999, meta), "ends past the payload end 1999")


def test_v3_overflowing_total(tmp_path):
    meta = {"format": "flashpack_v3", "target_dtype": "float64", "align_bytes": 128, "total_elems": 2**62, "index": []}
    expect_error(write_raw(tmp_path / "v3o.flashpack", b"", meta), "overflows")


def test_truncated_anywhere(tmp_path):
    src = str(tmp_path / "full.flashpack")
    flashpack_ops.save_file({"a": torch.randn(1000), "b": torch.arange(100), "c": torch.ones(3, dtype=torch.bool)}, src)
    data = open(src, "rb").read()
    cut_path = str(tmp_path / "cut.flashpack")
    cuts = sorted(set(list(range(0, 64)) + list(range(0, len(data), 97)) + list(range(len(data) - 300, len(data)))))
    for cut in cuts:
        open(cut_path, "wb").write(data[:cut])
        with pytest.raises(ValueError, match=re.escape(cut_path)):
            flashpack_ops.load_file(cut_path)


def test_payload_cut_out_of_the_middle(tmp_path):
    src = str(tmp_path / "full.flashpack")
    flashpack_ops.save_file({"a": torch.randn(1000), "b": torch.arange(100)}, src)
    data = open(src, "rb").read()
    path = str(tmp_path / "hole.flashpack")
    open(path, "wb").write(data[:100] + data[4196:])  # footer and trailer intact, payload short
    expect_error(path, "ends past the payload end")


def test_error_names_the_file_in_read_metadata(tmp_path):
    path = write_raw(tmp_path / "x.flashpack", b"", "{")
    with pytest.raises(ValueError, match=re.escape(path)):
        flashpack_ops.get_flashpack_file_metadata(path)


def test_unknown_keys_are_ignored(tmp_path):
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    meta = v4([dict(GOOD_ENTRY, extra={"nested": [1, 2.5, None, True]})], [dict(GOOD_BLOCK, note="hi")], producer="x")
    path = write_raw(tmp_path / "extra.flashpack", payload, meta)
    assert torch.equal(flashpack_ops.load_file(path)["w"], torch.arange(16.0).reshape(4, 4))


def test_dtype_aliases_are_accepted(tmp_path):
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    path = write_raw(tmp_path / "alias.flashpack", payload, v4([GOOD_ENTRY], [dict(GOOD_BLOCK, dtype="float")]))
    assert flashpack_ops.load_file(path)["w"].dtype == torch.float32


# --- a large index: the blocks move while it is read ------------------------------------------
# A load into memory of its own (copy=True, CUDA) whose footer lists its blocks before an index
# of 64 KiB or more starts moving the blocks at once and reads the index on another thread.

def large_index(count, block=0, **entry):
    """`count` float32 entries of shape [2, 2] laid one after another, with long names, so
    that the index passes 64 KiB: an index the blocks move ahead of."""
    return [dict({"name": f"model.layers.{k}.self_attn.q_proj.weight", "shape": [2, 2], "offset": 4 * k,
                  "length": 4, "macroblock": block}, **entry) for k in range(count)]


def block_of(values, offset_bytes=0):
    """The macroblock of float32 `values` laid at `offset_bytes`."""
    return {"dtype": "float32", "offset_bytes": offset_bytes, "length_bytes": values.numel() * 4,
            "length_elems": values.numel()}


def footer_by_hand(*members):
    """A footer's JSON text from (key, value) pairs in this order, a key allowed twice."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in members) + "}"


def expected_entries(index, values):
    return {e["name"]: values[e["offset"]:e["offset"] + 4].reshape(2, 2) for e in index}


def assert_loads(path, expected, gpus=()):
    """Mapped, copied and (onto each of `gpus`) CUDA loads all give `expected`, bit for bit, in order."""
    with open(path, "rb") as f:
        f.seek(-16, os.SEEK_END)
        footer_len = struct.unpack("<Q", f.read(8))[0]
    assert footer_len >= 64 << 10  # the size at which the index is read beside the blocks
    loads = [flashpack_ops.load_file(path), flashpack_ops.load_file(path, copy=True)]
    loads += [flashpack_ops.load_file(path, device) for device in gpus]
    for out in loads:
        assert list(out) == list(expected)
        for name, tensor in expected.items():
            assert torch.equal(out[name].cpu(), tensor), name


@pytest.mark.parametrize("order", ["blocks first", "index first"])
def test_a_large_index_loads_whichever_comes_first(tmp_path, order):
    values = torch.arange(4 * 2000, dtype=torch.float32)
    index = large_index(2000)
    block = block_of(values)
    members = [("format", "flashpack_v4"), ("macroblocks", [block]), ("index", index)]
    if order == "index first":
        members = [members[0], members[2], members[1]]
    path = write_raw(tmp_path / "large.flashpack", values.numpy().tobytes(), footer_by_hand(*members))
    assert_loads(path, expected_entries(index, values))


@pytest.mark.parametrize("order", ["dtype first", "dtype last"])
def test_a_large_v3_index_loads(tmp_path, order):
    values = torch.arange(4 * 2000, dtype=torch.float32)
    index = [{k: v for k, v in e.items() if k != "macroblock"} for e in large_index(2000)]
    members = [("format", "flashpack_v3"), ("target_dtype", "float32"), ("total_elems", values.numel()),
               ("index", index)]
    if order == "dtype last":
        members = [members[0], members[3], members[1], members[2]]
    path = write_raw(tmp_path / "v3.flashpack", values.numpy().tobytes(), footer_by_hand(*members))
    assert_loads(path, expected_entries(index, values))


def test_blocks_named_again_after_a_large_index_load_as_the_last_says(tmp_path):
    # JSON's last value wins (Python's json, so the reference, reads it so): the blocks that
    # started moving before the index was read are not the file's, and the load starts over.
    values = torch.arange(4 * 2000, dtype=torch.float32)
    first = block_of(values)
    last = dict(first, offset_bytes=256)
    index = large_index(2000)
    footer = footer_by_hand(("format", "flashpack_v4"), ("macroblocks", [first]), ("index", index),
                            ("macroblocks", [last]))
    payload = torch.full((64,), -1.0).numpy().tobytes() + values.numpy().tobytes()
    path = write_raw(tmp_path / "twice.flashpack", payload, footer)
    assert json.loads(footer)["macroblocks"] == [last]
    assert_loads(path, expected_entries(index, values))


@pytest.mark.parametrize("ahead", ["1", str(1 << 40)], ids=["every index ahead", "no index ahead"])
def test_the_index_size_read_ahead_comes_from_the_environment(tmp_path, monkeypatch, ahead):
    monkeypatch.setenv("FLASHPACK_INDEX_AHEAD_BYTES", ahead)
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    small = write_raw(tmp_path / "small.flashpack", payload, v4([GOOD_ENTRY], [GOOD_BLOCK]))
    twice = write_raw(tmp_path / "twice.flashpack", b"\0" * 64 + payload, footer_by_hand(
        ("format", "flashpack_v4"), ("macroblocks", [GOOD_BLOCK]), ("index", [GOOD_ENTRY]),
        ("macroblocks", [dict(GOOD_BLOCK, offset_bytes=64)])))
    for path in (small, twice):
        out = flashpack_ops.load_file(path, copy=True)
        assert list(out) == ["w"] and torch.equal(out["w"], torch.arange(16.0).reshape(4, 4))
    monkeypatch.setenv("FLASHPACK_INDEX_AHEAD_BYTES", "lots")
    with pytest.raises(ValueError, match="environment variable FLASHPACK_INDEX_AHEAD_BYTES='lots' is not a "
                                         "non-negative integer"):
        flashpack_ops.load_file(small, copy=True)


@pytest.mark.parametrize("entry, pattern", [
    ({"offset": 8000}, "index entry 'model.layers.1999.self_attn.q_proj.weight' ends at element 8004, past the end"),
    ({"shape": [2, 3]}, "the shape holds 6 elements but \"length\" says 4"),
    ({"macroblock": 1}, "refers to macroblock 1 but the file has 1"),
    ({"name": "model.layers.0.self_attn.q_proj.weight"}, "appears twice"),
])
def test_a_bad_entry_at_the_end_of_a_large_index_is_said_by_a_copied_load(tmp_path, entry, pattern):
    values = torch.arange(4 * 2000, dtype=torch.float32)
    index = large_index(2000)
    index[-1].update(entry)
    block = block_of(values)
    path = write_raw(tmp_path / "bad.flashpack", values.numpy().tobytes(), v4(index, [block]))
    expect_error(path, pattern)
    for load in (lambda: flashpack_ops.load_file(path, copy=True),
                 lambda: torch.ops.flashpack.load_blocks(path, "cpu", copy=True)):
        with pytest.raises(ValueError, match=pattern) as info:
            load()
        assert path in str(info.value)


NO_MEMORY_SCRIPT = r"""
import json, resource, struct, sys
import torch, flashpack_ops
from test_format_errors import large_index
path, index = sys.argv[1], large_index(2000)
if sys.argv[2] == "bad":
    index[-1]["shape"] = [2, 3]
size = 64 << 30  # sparse: nothing of it on disk
block = {"dtype": "uint8", "offset_bytes": 0, "length_bytes": size, "length_elems": size}
footer = json.dumps({"format": "flashpack_v4", "macroblocks": [block], "index": index}).encode()
with open(path, "wb") as f:
    f.truncate(size)
    f.seek(size)
    f.write(footer + struct.pack("<Q", len(footer)) + b"FLASHPK\0")
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
try:
    flashpack_ops.load_file(path, copy=True)
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an address-space limit (RLIMIT_AS)")
@pytest.mark.parametrize("index", ["bad", "good"])
def test_no_memory_for_the_blocks_of_a_large_index(tmp_path, index):
    # 64 GiB of blocks under an 8 GiB address-space limit: a refused index is still what the
    # load says, as where the index is read before anything is allocated; a good one leaves
    # the allocator's error, with the file named.
    path = str(tmp_path / "huge.flashpack")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                                    os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", NO_MEMORY_SCRIPT, path, index], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    said = out.stdout.strip()
    if index == "bad":
        assert said.startswith("ValueError") and "the shape holds 6 elements" in said and path in said, said
    else:
        assert said.startswith(("RuntimeError", "OutOfMemoryError")) and "68719476736 bytes" in said, said
        assert f"while loading '{path}' to cpu" in said, said


def test_a_broken_large_index_is_said_as_broken_json(tmp_path):
    values = torch.arange(4 * 2000, dtype=torch.float32)
    block = block_of(values)
    footer = footer_by_hand(("format", "flashpack_v4"), ("macroblocks", [block]), ("index", large_index(2000)))
    path = write_raw(tmp_path / "cut.flashpack", values.numpy().tobytes(), footer[:-2])
    for copy in (False, True):
        with pytest.raises(ValueError, match="footer is not valid JSON") as info:
            flashpack_ops.load_file(path, copy=copy)
        assert path in str(info.value)


# --- save errors: clear message, old file intact, no temporary left ---------------------------

def _assert_intact(tmp_file, original):
    assert torch.equal(flashpack_ops.load_file(tmp_file)["ok"], original)
    assert os.listdir(os.path.dirname(tmp_file)) == [os.path.basename(tmp_file)]


@pytest.mark.parametrize("bad, pattern", [
    (lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8), "tensor 'bad' is quantized"),
    (lambda: torch.randn(3, 3).to_sparse(), "tensor 'bad' has layout Sparse"),
    (lambda: torch.empty(3, device="meta"), "tensor 'bad' is on the meta device"),
], ids=["quantized", "sparse", "meta"])
def test_failed_save_leaves_the_old_file(tmp_file, bad, pattern):
    original = torch.randn(100)
    flashpack_ops.save_file({"ok": original}, tmp_file)
    with pytest.raises(ValueError, match=pattern) as info:
        flashpack_ops.save_file({"ok": torch.zeros(100), "bad": bad()}, tmp_file)
    assert tmp_file in str(info.value)
    _assert_intact(tmp_file, original)


def test_failed_conversion_leaves_the_old_file(tmp_file):
    original = torch.randn(100)
    flashpack_ops.save_file({"ok": original}, tmp_file)
    with pytest.raises(ValueError, match="tensor 'bits' cannot be converted to float32"):
        flashpack_ops.save_file({"ok": torch.zeros(100), "bits": torch.zeros(4, dtype=torch.uint8).view(torch.bits8)},
                                tmp_file, target_dtype=torch.float32, floating_only=False)
    _assert_intact(tmp_file, original)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"align_bytes": -1}, "align_bytes must be between 0 and 2\\^30"),
    ({"target_dtype": torch.qint8}, "target_dtype QInt8 cannot be stored"),
    ({"num_threads": -1}, "num_threads must be >= 0 \\(0 picks the default\\), got -1"),
])
def test_bad_save_arguments(tmp_file, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file, **kwargs)
    assert not os.path.exists(tmp_file)


@pytest.mark.parametrize("call, kwargs, exc, message", [
    ("save", {"align_bytes": "128"}, TypeError, r"align_bytes must be an int, got str '128'"),
    ("save", {"num_threads": 1.5}, TypeError, r"num_threads must be an int, got float 1.5"),
    ("save", {"num_threads": -1}, ValueError, r"num_threads must be >= 0 \(0 picks the default\), got -1"),
    ("save", {"checksum": "yes"}, TypeError, r"checksum must be a bool, got str 'yes'"),
    ("save", {"durable": None}, TypeError, r"durable must be a bool, got NoneType None"),
    ("load", {"copy": "yes"}, TypeError, r"copy must be a bool, got str 'yes'"),
    ("load", {"num_threads": "4"}, TypeError, r"num_threads must be an int, got str '4'"),
    ("load", {"pinned_bytes": 2**70}, ValueError, r"pinned_bytes=1180591620717411303424 does not fit in 64 bits"),
    ("load", {"names": 5}, TypeError, r"names must be a list of entry names, not the int 5"),
    ("verify", {"num_threads": "a"}, TypeError, r"num_threads must be an int, got str 'a'"),
    ("verify", {"num_threads": -1}, ValueError, r"num_threads must be >= 0 \(0 picks the default\), got -1"),
    ("read_flashpack_file", {"chunk_bytes": "a"}, TypeError, r"chunk_bytes must be an int, got str 'a'"),
])
def test_wrong_argument_types_name_the_argument_and_the_file(tmp_file, call, kwargs, exc, message):
    # Not the operator's RuntimeError, which prints its schema and names no file.
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file, checksum=True)
    calls = {"save": lambda: flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file, **kwargs),
             "load": lambda: flashpack_ops.load_file(tmp_file, **kwargs),
             "verify": lambda: flashpack_ops.verify_file(tmp_file, **kwargs),
             "read_flashpack_file": lambda: flashpack_ops.read_flashpack_file(tmp_file, **kwargs)}
    with pytest.raises(exc, match=message) as info:
        calls[call]()
    assert f"'{tmp_file}'" in str(info.value)


@pytest.mark.parametrize("op, verb", [
    (lambda p: torch.ops.flashpack.save({"a": torch.ones(1)}, p, num_threads=-1), "save"),
    (lambda p: torch.ops.flashpack.verify(p, num_threads=-1), "verify"),
    (lambda p: torch.ops.flashpack.read_range(p, 0, 4, num_threads=-1), "read"),
], ids=["save", "verify", "read_range"])
def test_the_operators_name_the_file_of_a_negative_thread_count(tmp_file, op, verb):
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file, checksum=True)
    with pytest.raises(ValueError, match=rf"cannot {verb} '{re.escape(tmp_file)}': num_threads must be >= 0 "
                                         r"\(0 picks the default\), got -1"):
        op(tmp_file)


def test_numpy_bools_and_integers_are_taken_as_the_operators_take_them(tmp_file):
    # A flag read from an array (np.True_) is no numbers.Integral, and numpy's integers are GPU
    # indices to torch.device: both passed before the arguments were checked here.
    np = pytest.importorskip("numpy")
    tensors = {"a": torch.arange(4, dtype=torch.float32)}
    flashpack_ops.save_file(tensors, tmp_file, checksum=np.True_, durable=np.False_, align_bytes=np.int64(64))
    flashpack_ops.verify_file(tmp_file, num_threads=np.int32(1))
    for copy in (np.True_, np.False_):
        loaded = flashpack_ops.load_file(tmp_file, copy=copy, verify=np.True_, num_threads=np.int64(2))
        assert torch.equal(loaded["a"], tensors["a"])
    assert flashpack_ops.ops._device(np.int64(1)) == torch.device("cuda", 1)
    with pytest.raises(TypeError, match=r"copy must be a bool, got numpy\.float64 np\.float64\(1\.0\)"):
        flashpack_ops.load_file(tmp_file, copy=np.float64(1.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"num_threads": -1}, r"num_threads must be >= 0 \(0 picks the default\), got -1"),
    ({"chunk_bytes": -1}, r"chunk_bytes must be >= 0"),
    ({"pinned_bytes": -5}, r"pinned_bytes must be >= 0"),
    ({"num_streams": -2}, r"num_streams must be >= 0"),
    ({"route": "fast"}, r"unknown route 'fast' \(expected auto, direct, buffered, mapped or register\)"),
])
@pytest.mark.parametrize("copy", [False, True])
def test_bad_load_options_are_named_on_the_cpu_too(tmp_file, kwargs, message, copy):
    # The CUDA options mean nothing to a CPU load, but a wrong value is a wrong call anywhere.
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file)
    with pytest.raises(ValueError, match=message):
        torch.ops.flashpack.load(tmp_file, "cpu", copy=copy, **kwargs)


@pytest.mark.parametrize("device, exc, message", [
    ("gpu", ValueError, r"device='gpu' is not a device \(\"cpu\", \"cuda\", \"cuda:1\" or a GPU index; unknown device "
                        r"type\)"),
    (-1, ValueError, r"device=-1 is not a device \(.*; Device index must not be negative\)"),
    (1.5, TypeError, r"device must be a str, an int or a torch.device, got float"),
])
@pytest.mark.parametrize("call", ["load_file", "read_flashpack_file", "safe_open", "assign_from_file"])
def test_a_wrong_device_is_named_with_the_file(tmp_file, call, device, exc, message):
    # torch's own errors name no file, and a misspelt device is a RuntimeError there.
    flashpack_ops.save_file(torch.nn.Linear(2, 2).state_dict(), tmp_file)
    calls = {"load_file": lambda: flashpack_ops.load_file(tmp_file, device),
             "read_flashpack_file": lambda: flashpack_ops.read_flashpack_file(tmp_file, device),
             "safe_open": lambda: flashpack_ops.safe_open(tmp_file, framework="pt", device=device),
             "assign_from_file": lambda: flashpack_ops.assign_from_file(torch.nn.Linear(2, 2), tmp_file, device)}
    with pytest.raises(exc, match=message) as info:
        calls[call]()
    assert tmp_file in str(info.value)


@pytest.mark.parametrize("call", ["load", "save", "verify"])
def test_a_bad_thread_count_in_the_environment_is_named(tmp_file, monkeypatch, call):
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file, checksum=True)
    monkeypatch.setenv("FLASHPACK_NUM_THREADS", "eight")
    with pytest.raises(ValueError, match="environment variable FLASHPACK_NUM_THREADS='eight' is not a non-negative "
                                         "integer"):
        if call == "load":
            flashpack_ops.load_file(tmp_file, copy=True)
        elif call == "save":
            flashpack_ops.save_file({"a": torch.ones(1)}, tmp_file)
        else:
            flashpack_ops.verify_file(tmp_file)


@pytest.mark.parametrize("num_threads", [2**31, 2**32 - 1, 2**32, 2**63 - 1])
def test_thread_counts_past_an_int_are_the_upper_bound_not_another_number(tmp_file, num_threads):
    # Once cut to 32 bits, 2**31 read as negative and 2**32 as 0 (the default).
    tensors = {"a": torch.arange(10.0)}
    flashpack_ops.save_file(tensors, tmp_file, num_threads=num_threads, checksum=True)
    assert torch.equal(flashpack_ops.load_file(tmp_file, copy=True, num_threads=num_threads)["a"], tensors["a"])
    flashpack_ops.verify_file(tmp_file, num_threads=num_threads)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = str(tmp_path / "pipe.flashpack")
    os.mkfifo(fifo)
    code = ("import sys, flashpack_ops\n"
            "for read in (flashpack_ops.load_file, flashpack_ops.read_metadata):\n"
            "    try:\n"
            "        read(sys.argv[1])\n"
            "    except RuntimeError as e:\n"
            "        print(e)\n"
            "print(flashpack_ops.is_flashpack_file(sys.argv[1]))\n")
    # In a child process: before, the open waited for a writer that never came.
    out = subprocess.run([sys.executable, "-c", code, fifo], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"flashpack::load: '{fifo}' is not a regular file, not a flashpack file",
                                       f"flashpack::read_footer: '{fifo}' is not a regular file, not a flashpack file",
                                       "False"]


def test_save_into_missing_directory(tmp_path):
    path = str(tmp_path / "no" / "such" / "dir" / "m.flashpack")
    with pytest.raises(RuntimeError, match="cannot create a temporary file in .*No such file"):
        flashpack_ops.save_file({"a": torch.ones(1)}, path)


def test_save_over_a_directory(tmp_path):
    with pytest.raises(RuntimeError, match="is a directory"):
        flashpack_ops.save_file({"a": torch.ones(1)}, tmp_path)


def test_empty_tensor_with_huge_leading_dimension_round_trips(tmp_file):
    # The first dimension is in no stride: torch makes this tensor, so it must load too.
    t = torch.empty((2**40, 0, 2**40))
    flashpack_ops.save_file({"t": t}, tmp_file)
    assert flashpack_ops.load_file(tmp_file)["t"].shape == (2**40, 0, 2**40)


def test_save_refuses_a_shape_no_reader_can_rebuild(tmp_file):
    t = torch.empty_strided((0, 2**62, 4), (1, 1, 1))
    with pytest.raises(ValueError, match="tensor 't' has shape \\[0, 4611686018427387904, 4\\], whose contiguous "
                                         "strides exceed 2\\^63 - 1"):
        flashpack_ops.save_file({"t": t}, tmp_file)
    assert not os.path.exists(tmp_file)


def test_save_refuses_what_readers_would_refuse(tmp_file):
    # Written, these files would then fail to load: refused at save, the old file kept.
    original = torch.randn(10)
    flashpack_ops.save_file({"ok": original}, tmp_file)
    with pytest.raises(ValueError, match="tensor 'deep' has 65 dimensions, more than the 64 a flashpack file may hold"):
        flashpack_ops.save_file({"deep": torch.zeros([1] * 65)}, tmp_file)
    with pytest.raises(ValueError, match="the index of 1 tensors takes [0-9]+ bytes, more than the 268435456 a reader "
                                         "accepts"):
        flashpack_ops.save_file({"x" * (257 << 20): torch.ones(1)}, tmp_file)
    _assert_intact(tmp_file, original)
    flashpack_ops.save_file({"deep": torch.zeros([1] * 64)}, tmp_file)
    assert flashpack_ops.load_file(tmp_file)["deep"].dim() == 64


def _fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.empty(1024)


def _freed_parameter():
    t = torch.nn.Parameter(torch.randn(1024))
    t.untyped_storage().resize_(0)  # how FSDP frees a sharded parameter's full storage
    return t


def _shrunk_storage():
    t = torch.randn(1024)
    t.untyped_storage().resize_(64)
    return t


def _wrapper_subclass():
    from torch.testing._internal.two_tensor import TwoTensor
    return TwoTensor(torch.ones(3, 4), torch.zeros(3, 4))


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
@pytest.mark.parametrize("make, needed, held", [
    (_fake_tensor, 4096, 0), (_freed_parameter, 4096, 0), (_shrunk_storage, 4096, 64), (_wrapper_subclass, 48, 0),
], ids=["fake", "freed", "shrunk", "wrapper_subclass"])
def test_tensors_without_their_data_are_refused(tmp_file, make, needed, held, checksum):
    # Saved from memory that is not there, these once crashed the process or wrote other memory.
    original = torch.randn(10)
    flashpack_ops.save_file({"ok": original}, tmp_file)
    with pytest.raises(ValueError, match=f"tensor 'bad' has no data in memory to save: it needs {needed} bytes of "
                                         f"storage but its storage holds {held}") as info:
        flashpack_ops.save_file({"ok": torch.zeros(10), "bad": make()}, tmp_file, checksum=checksum)
    assert tmp_file in str(info.value)
    _assert_intact(tmp_file, original)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_tensors_are_refused_by_name(tmp_file, layout):
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    with pytest.raises(ValueError, match=f"'{re.escape(tmp_file)}': tensor 'nt' is a nested tensor; save its "
                                         "components"):
        flashpack_ops.save_file({"nt": nt}, tmp_file)


@pytest.mark.parametrize("tensors, exc, pattern", [
    ({3: torch.ones(1)}, TypeError, "the name 3 is a int, not a str"),
    ({"w": [1.0, 2.0]}, TypeError, "'w' is a list, not a Tensor"),
    ({"bad\ud800": torch.ones(1)}, ValueError, "the name 'bad\\\\ud800' cannot be written as UTF-8"),
], ids=["int_name", "not_a_tensor", "lone_surrogate"])
def test_bad_names_and_values_are_named(tmp_file, tensors, exc, pattern):
    with pytest.raises(exc, match=f"cannot save '{re.escape(tmp_file)}': {pattern}"):
        flashpack_ops.save_file(tensors, tmp_file)


def test_paths_with_a_nul_byte_are_refused(tmp_path):
    # The OS would stop at the NUL: "m\0.x" would silently be "m".
    flashpack_ops.save_file({"a": torch.ones(1)}, tmp_path / "m")
    bad = str(tmp_path / "m\0.x")
    with pytest.raises(ValueError, match="the path contains a NUL byte"):
        flashpack_ops.save_file({"a": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="the path contains a NUL byte"):
        flashpack_ops.load_file(bad)
    # The operators check too, for TorchScript and C++ callers.
    with pytest.raises(ValueError, match="the path contains a NUL byte"):
        torch.ops.flashpack.load(bad, "cpu")
    with pytest.raises(ValueError, match="the path contains a NUL byte"):
        torch.ops.flashpack.save({"a": torch.zeros(1)}, bad)
    assert torch.equal(flashpack_ops.load_file(tmp_path / "m")["a"], torch.ones(1))
    assert os.listdir(tmp_path) == ["m"]


def test_a_path_that_is_not_utf8_is_named(tmp_path):
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff\xfe.flashpack")
    for call in (lambda: flashpack_ops.save_file({"a": torch.ones(1)}, bad), lambda: flashpack_ops.load_file(bad)):
        with pytest.raises(ValueError, match="the path is not valid UTF-8"):
            call()


def test_save_rejects_non_mapping(tmp_file):
    with pytest.raises(TypeError, match="mapping"):
        flashpack_ops.save_file([torch.ones(1)], tmp_file)


def test_escaped_names_are_decoded(tmp_path):
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    footer = json.dumps(v4([dict(GOOD_ENTRY, name="caf\u00e9 \U0001f642 \"q\" \\ \n")], [GOOD_BLOCK]), ensure_ascii=True)
    assert "\\u00e9" in footer and "\\ud83d\\ude42" in footer
    path = write_raw(tmp_path / "esc.flashpack", payload, footer)
    assert list(flashpack_ops.load_file(path)) == ["caf\u00e9 \U0001f642 \"q\" \\ \n"]


def test_footer_larger_than_the_limit(tmp_path):
    # A sparse file: 300 MiB long, almost nothing on disk.
    path = str(tmp_path / "huge.flashpack")
    size = 300 << 20
    with open(path, "wb") as f:
        f.truncate(size - 16)
        f.seek(size - 16)
        f.write(struct.pack("<Q", 257 << 20) + MAGIC)
    expect_error(path, "exceeds the limit of 268435456 bytes")


@pytest.mark.parametrize("save", ["save_file", "pack_to_file"])
def test_a_lazy_modules_uninitialized_parameters_are_refused(tmp_file, save):
    # Before its first forward a lazy module holds empty placeholders of unknown shape: stored,
    # they would be empty tensors that no model of the real sizes loads.
    original = torch.randn(10)
    flashpack_ops.save_file({"ok": original}, tmp_file)
    lazy = torch.nn.LazyLinear(4).state_dict()
    with pytest.raises(ValueError, match=f"'{re.escape(tmp_file)}': 'weight' is an uninitialized \\(lazy\\) "
                                         "UninitializedParameter: run the model once"):
        getattr(flashpack_ops, save)({"ok": torch.zeros(10), **lazy}, tmp_file)
    _assert_intact(tmp_file, original)


def test_a_lazy_model_saves_once_initialized(tmp_file):
    model = torch.nn.LazyLinear(4)
    model(torch.ones(2, 3))
    flashpack_ops.save_file(model.state_dict(), tmp_file)
    loaded = flashpack_ops.load_file(tmp_file)
    assert torch.equal(loaded["weight"], model.weight) and torch.equal(loaded["bias"], model.bias)
