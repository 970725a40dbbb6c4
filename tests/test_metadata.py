"""Free-form metadata in the footer: saved, read back, checked, kept by convert and revert."""

import json

import pytest
import torch

import flashpack_ops
from conftest import assert_same_dict
from test_format_errors import GOOD_BLOCK, GOOD_ENTRY, expect_error, v4, write_raw
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


@pytest.mark.parametrize("metadata, pattern", [
    ([], r"\"metadata\" must be an object of strings"),
    ("pt", r"\"metadata\" must be an object of strings"),
    ({"format": 1}, r"\"metadata\" value of 'format' must be a string"),
    ({"format": None}, r"\"metadata\" value of 'format' must be a string"),
])
def test_bad_metadata_in_a_footer(tmp_path, metadata, pattern):
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    path = write_raw(tmp_path / "bad.flashpack", payload, v4([GOOD_ENTRY], [GOOD_BLOCK], metadata=metadata))
    expect_error(path, pattern)


def test_a_key_twice_in_a_footer(tmp_path):
    payload = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    footer = json.dumps(v4([GOOD_ENTRY], [GOOD_BLOCK], metadata={"format": "pt"}))
    footer = footer.replace('"metadata": {"format": "pt"}', '"metadata": {"format": "pt", "format": "np"}')
    path = write_raw(tmp_path / "bad.flashpack", payload, footer)
    expect_error(path, "\"metadata\" has the key 'format' twice")


def test_checksums_cover_the_metadata(tmp_path):
    path, edited = tmp_path / "m.flashpack", tmp_path / "edited.flashpack"
    flashpack_ops.save_file(TENSORS, path, metadata={"format": "pt"}, checksum=True)
    flashpack_ops.verify_file(path)
    rewrite_footer(path, edited, lambda meta: meta["metadata"].update(format="np"))
    with pytest.raises(ValueError, match="index"):
        flashpack_ops.verify_file(edited)
    with pytest.raises(ValueError, match="index"):
        flashpack_ops.load_file(edited, verify=True)
