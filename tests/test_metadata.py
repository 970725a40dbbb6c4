"""Free-form metadata in the footer: saved, read back, checked, kept by convert and revert."""

import json

import pytest
import torch

import flashpack_ops
from conftest import assert_same_dict
from test_format_errors import GOOD_BLOCK, GOOD_ENTRY, v4, write_raw
from test_integrity import rewrite_footer

TENSORS = {"w": torch.arange(6.0).reshape(2, 3), "steps": torch.tensor(3)}
METADATA = {"format": "pt", "quote \" and newline \n": "é, 字, \u0000 and \\"}


def test_round_trip(tmp_path):
    path = tmp_path / "m.flashpack"
    flashpack_ops.save_file(TENSORS, path, metadata=METADATA)
    assert flashpack_ops.read_metadata(path)["metadata"] == METADATA
    with flashpack_ops.safe_open(path, framework="pt") as f:
        assert f.metadata() == METADATA
    assert_same_dict(flashpack_ops.load_file(path), TENSORS)
    assert dict(torch.ops.flashpack.metadata(str(path))) == METADATA
    # None and {} store nothing, as before.
    for empty in (None, {}):
        flashpack_ops.save_file(TENSORS, path, metadata=empty)
        assert "metadata" not in flashpack_ops.read_metadata(path)
        assert flashpack_ops.safe_open(path).metadata() is None


def test_the_reference_reads_a_file_with_metadata(tmp_path):
    pytest.importorskip("flashpack")
    from flashpack.deserialization import iterate_from_flash_tensor, read_flashpack_file

    path = str(tmp_path / "m.flashpack")
    flashpack_ops.save_file({"w": TENSORS["w"]}, path, metadata=METADATA)
    storage, meta = read_flashpack_file(path)
    assert torch.equal(list(iterate_from_flash_tensor(storage, meta))[0][1], TENSORS["w"])


@pytest.mark.parametrize("metadata, error", [
    ({"a": 1}, TypeError), ({1: "a"}, TypeError), ([("a", "b")], TypeError), ({"a": "\ud800"}, ValueError),
], ids=["int value", "int key", "a list", "lone surrogate"])
def test_save_refuses_what_is_not_text(tmp_path, metadata, error):
    path = tmp_path / "m.flashpack"
    flashpack_ops.save_file(TENSORS, path)
    before = path.read_bytes()
    with pytest.raises(error, match="m.flashpack"):
        flashpack_ops.save_file(TENSORS, path, metadata=metadata)
    assert path.read_bytes() == before


def test_oversize_metadata_is_refused_at_save(tmp_path):
    with pytest.raises(ValueError, match=r"the index of 2 tensors and the metadata takes \d+ bytes, more than .* "
                                         r"\(names or metadata too long"):
        flashpack_ops.save_file(TENSORS, tmp_path / "m.flashpack", metadata={"big": "x" * (257 << 20)})


@pytest.mark.parametrize("metadata", [None, [], "pt", {"format": 1}, {"format": None}, {"config": {"a": "b"}}],
                         ids=str)
def test_another_writers_metadata_is_ignored(tmp_path, metadata):
    # "metadata" that is not an object of strings is another writer's use of the name: the
    # file loads (as the reference loads it) and has no metadata of ours.
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    path = write_raw(tmp_path / "other.flashpack", payload, v4([GOOD_ENTRY], [GOOD_BLOCK], metadata=metadata))
    assert torch.equal(flashpack_ops.load_file(path)["w"], torch.arange(16.0).reshape(4, 4))
    assert dict(torch.ops.flashpack.metadata(path)) == {}
    with flashpack_ops.safe_open(path, framework="pt") as f:
        assert f.metadata() is None


def test_checksums_cover_the_metadata_apart_from_the_index(tmp_path):
    path, edited = tmp_path / "m.flashpack", tmp_path / "edited.flashpack"
    flashpack_ops.save_file(TENSORS, path, metadata={"format": "pt"}, checksum=True)
    flashpack_ops.verify_file(path)
    # The index checksum is the one a file without metadata has: readers that do not know
    # the metadata still verify the index.
    flashpack_ops.save_file(TENSORS, tmp_path / "plain.flashpack", checksum=True)
    meta = flashpack_ops.read_metadata(path)
    assert meta["index_crc32c"] == flashpack_ops.read_metadata(tmp_path / "plain.flashpack")["index_crc32c"]
    assert "metadata_crc32c" in meta
    for edit, problem in ((lambda m: m["metadata"].update(format="np"), "the metadata does not match its checksum"),
                          (lambda m: m.pop("metadata"), r"\(\"metadata_crc32c\"\) but no \"metadata\""),
                          (lambda m: m.update(metadata={"format": 1}), "its \"metadata\" is not string pairs")):
        rewrite_footer(path, edited, edit)
        with pytest.raises(ValueError, match=problem):
            flashpack_ops.verify_file(edited)
        with pytest.raises(ValueError, match=problem):
            flashpack_ops.load_file(edited, verify=True)
        assert_same_dict(flashpack_ops.load_file(edited), TENSORS)  # unverified, the tensors load


def test_a_key_named_twice_keeps_its_last_value_as_python_reads_it(tmp_path):
    path, edited = tmp_path / "m.flashpack", tmp_path / "edited.flashpack"
    flashpack_ops.save_file(TENSORS, path, metadata={"format": "pt", "note": "x"}, checksum=True)
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[-16:-8], "little")
    footer = raw[-16 - n:-16].replace(b'"metadata":{"format":"pt"', b'"metadata":{"format":"np","format":"pt"')
    with open(edited, "wb") as f:
        f.write(raw[:-16 - n] + footer + len(footer).to_bytes(8, "little") + raw[-8:])
    # The pairs the checksum was computed over, in the same order: C++ and Python agree.
    flashpack_ops.verify_file(edited)
    assert flashpack_ops.safe_open(edited).metadata() == {"format": "pt", "note": "x"}


def test_a_key_named_twice_is_judged_by_its_last_value_in_cpp_as_in_python(tmp_path):
    path, edited = tmp_path / "m.flashpack", tmp_path / "edited.flashpack"
    flashpack_ops.save_file(TENSORS, path, metadata={"a": "x"}, checksum=True)
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[-16:-8], "little")
    for pairs, ours in ((b'{"a":1,"a":"x"}', True), (b'{"a":"x","a":1}', False)):
        footer = raw[-16 - n:-16].replace(b'"metadata":{"a":"x"}', b'"metadata":' + pairs)
        with open(edited, "wb") as f:
            f.write(raw[:-16 - n] + footer + len(footer).to_bytes(8, "little") + raw[-8:])
        assert flashpack_ops.safe_open(edited).metadata() == ({"a": "x"} if ours else None)
        if ours:
            flashpack_ops.verify_file(edited)  # C++ read the same pair the checksum covers
        else:
            with pytest.raises(ValueError, match="its \"metadata\" is not string pairs"):
                flashpack_ops.verify_file(edited)
