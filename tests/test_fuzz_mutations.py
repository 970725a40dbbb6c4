"""Randomly damaged files, loaded in-process: every load ends in a clear error or in tensors
that are exactly what the footer describes.

Thousands of deterministic mutations (seeded RNG) of real files written by flashpack_ops and
by the reference ``flashpack``: bit flips, truncations, payload cuts, edits of the footer's
text, of its JSON values and of the trailer's length field. For each file:

* a failed load raises ValueError or RuntimeError whose message names the file;
* a successful load gives, for every entry of the footer (as Python's ``json`` reads it), a
  tensor of that name, dtype and shape whose bytes are the file's bytes at that offset;
  the mapped and the copying load agree; where the mutation left the payload alone, an entry
  whose place in the file is unchanged is bit for bit the original tensor.

The coverage-guided fuzzers in fuzz/ go deeper; this runs everywhere pytest does.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch

import flashpack_ops

MAGIC = b"FLASHPK\x00"
TRAILER = 16
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "fuzz", "corpus", "load")

# Values a hostile footer might hold: boundaries of every integer width the reader uses,
# non-integers, wrong types, and shapes whose size or strides overflow.
INTERESTING = [
    -1, 0, 1, 2, 3, 7, 127, 128, 4095, 4096, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
    2**64 - 1, 2**64, 10**30, 0.5, 1e308, -0.0, "x", "", "float32", "bfloat16", "int64", "bool", "uint1",
    "complex128", "flashpack_v3", "flashpack_v4", None, True, False, [], {}, [0], [0, 2**62, 2**62],
    [2**31, 2**31, 2**31], [1] * 65, [3, 4], ["3"], [[1]],
]


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

def split(data: bytes):
    """(payload, footer) of a well-formed file."""
    (n,) = struct.unpack("<Q", data[-TRAILER:-8])
    return data[: len(data) - TRAILER - n], data[len(data) - TRAILER - n : -TRAILER]


def assemble(payload: bytes, footer: bytes) -> bytes:
    return payload + footer + struct.pack("<Q", len(footer)) + MAGIC


def dtype_of(name):
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) else None


def element_size(dt: torch.dtype) -> int:
    return torch.empty(0, dtype=dt).element_size()


def as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).view(torch.uint8).numpy().tobytes()


class Duplicates(list):
    """A JSON object as a list of (key, value) pairs, so that a key can appear twice."""


def dumps(obj) -> str:
    if isinstance(obj, Duplicates):
        return "{" + ",".join(json.dumps(k) + ":" + dumps(v) for k, v in obj) + "}"
    if isinstance(obj, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + dumps(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def describe(data: bytes):
    """What a footer promises, read independently of the code under test (with Python's json,
    as the reference does: of two equal keys, the last wins): a list of (name, dtype, shape,
    byte offset, byte length), or None if the footer is not JSON."""
    if len(data) < TRAILER or data[-8:] != MAGIC:
        return None
    payload, footer = split(data)
    try:
        meta = json.loads(footer.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if meta.get("format") == "flashpack_v3":
        blocks = [{"dtype": meta.get("target_dtype"), "offset_bytes": 0}]
    else:
        blocks = meta.get("macroblocks")
    out = []
    for rec in meta.get("index", []):
        block = blocks[rec.get("macroblock", 0)]
        dt = dtype_of(block["dtype"])
        esize = element_size(dt)
        out.append((rec["name"], dt, list(rec["shape"]), block["offset_bytes"] + rec["offset"] * esize,
                    rec["length"] * esize))
    return out


# ---------------------------------------------------------------------------------------
# Mutations: each takes (rng, data) and returns (new data, whether the payload is untouched)
# ---------------------------------------------------------------------------------------

def flip_bits(rng, data):
    data = bytearray(data)
    payload_len = len(split(bytes(data))[0])
    touched = False
    for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
        # Half the flips land in the footer or trailer, where one bit matters most.
        pos = rng.randrange(payload_len, len(data)) if rng.random() < 0.5 or payload_len == 0 else rng.randrange(len(data))
        touched |= pos < payload_len
        data[pos] ^= 1 << rng.randrange(8)
    return bytes(data), not touched


def truncate(rng, data):
    return data[: rng.randrange(len(data))], False


def extend(rng, data):
    return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))), True


def cut_payload(rng, data):
    payload, footer = split(data)
    if not payload:
        return assemble(payload, footer), True
    a = rng.randrange(len(payload))
    b = rng.randrange(a, min(len(payload), a + 4096) + 1)
    return assemble(payload[:a] + payload[b:], footer), False


def edit_footer_text(rng, data):
    payload, footer = split(data)
    text = bytearray(footer)
    for _ in range(rng.choice([1, 1, 2, 3])):
        pos = rng.randrange(len(text) + 1)
        op = rng.randrange(3)
        token = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"0", b"9", b"-", b".", b"e", b" ",
                            b"\\", b"\\u", b"\xff", b"\xc3", b"\x00", b"1", b"99999999999999999999"])
        if op == 0:
            text[pos:pos] = token
        elif op == 1 and pos < len(text):
            del text[pos : pos + rng.randrange(1, 4)]
        else:
            text[pos : pos + len(token)] = token
    return assemble(payload, bytes(text)), True


def _slots(node, path=()):
    """Every (container path, key) in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k
            yield from _slots(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path, i
            yield from _slots(v, path + (i,))


def edit_footer_json(rng, data):
    payload, footer = split(data)
    meta = json.loads(footer)
    slots = list(_slots(meta))
    path, key = rng.choice(slots)
    parent = meta
    for p in path:
        parent = parent[p]
    old = parent[key]
    op = rng.randrange(10)
    if op <= 4:
        choices = INTERESTING
        if isinstance(old, int) and not isinstance(old, bool):
            choices = INTERESTING + [old + 1, old - 1, old * 2, old + 128, old + 4096]
        parent[key] = rng.choice(choices)
    elif op == 5 and isinstance(parent, dict):
        del parent[key]
    elif op == 6 and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(parent[key])))  # a duplicated element
    elif op == 7 and isinstance(parent, dict):
        # The same key twice, with a different value second.
        items = list(parent.items())
        dup = Duplicates(items + [(key, rng.choice(INTERESTING))])
        if path:
            grand = meta
            for p in path[:-1]:
                grand = grand[p]
            grand[path[-1]] = dup
        else:
            meta = dup
    elif op == 8 and len(meta["index"]) >= 2:
        # Two entries exchange their names: a load must follow the footer, not the order.
        i, j = rng.sample(range(len(meta["index"])), 2)
        index = meta["index"]
        index[i]["name"], index[j]["name"] = index[j]["name"], index[i]["name"]
    else:
        parent[key] = rng.choice([{}, [], "name", 0])
    return assemble(payload, dumps(meta).encode("utf-8")), True


def edit_trailer_length(rng, data):
    payload, footer = split(data)
    n = rng.choice([0, 1, len(footer) - 1, len(footer) + 1, len(payload) + len(footer), len(payload) + len(footer) + 1,
                    2**30, 2**30 + 1, 2**63, 2**64 - 1, 2**64 - 16])
    return payload + footer + struct.pack("<Q", n) + MAGIC, True


MUTATIONS = [flip_bits, truncate, extend, cut_payload, edit_footer_text, edit_footer_json, edit_footer_json,
             edit_trailer_length]


# ---------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------

def check_load(path: str, data: bytes, original=None) -> str:
    """Loads `path` (holding `data`) and checks the outcome; returns "error" or "loaded".
    `original`: name -> (dtype, shape, byte offset, tensor) of the unmutated file, given
    when the mutation left the payload untouched."""
    try:
        loaded = flashpack_ops.load_file(path)
    except (ValueError, RuntimeError) as e:
        assert path in str(e), f"error does not name the file: {e}"
        assert len(str(e)) > len(path) + 30, f"error says too little: {e}"
        return "error"
    promised = describe(data)
    assert promised is not None, f"{path} loaded, but Python's json cannot read its footer"
    assert list(loaded) == [p[0] for p in promised], "names or order differ from the footer"
    assert flashpack_ops.read_metadata(path) == json.loads(split(data)[1]), "read_metadata differs from the footer"
    copied = flashpack_ops.load_file(path, copy=True)
    for (name, dt, shape, offset, nbytes), t, c in zip(promised, loaded.values(), copied.values()):
        assert t.dtype == dt and list(t.shape) == shape, f"{name}: {t.dtype}{list(t.shape)} vs footer {dt}{shape}"
        assert c.dtype == dt and list(c.shape) == shape
        got = as_bytes(t)
        assert got == data[offset : offset + nbytes], f"{name}: bytes differ from the file at the footer's offset"
        assert as_bytes(c) == got, f"{name}: the copying load differs from the mapped one"
        if original is not None and name in original:
            odt, oshape, ooffset, otensor = original[name]
            if (odt, oshape, ooffset) == (dt, shape, offset):
                assert got == as_bytes(otensor), f"{name}: differs from the original tensor"
    return "loaded"


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------

def base_state_dicts():
    g = torch.Generator().manual_seed(1)
    tied = torch.randn(8, 4, generator=g)
    return {
        "mixed": {
            "emb": tied,
            "w": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "lm_head": tied,
            "b": torch.randn(8, generator=g).half(),
            "steps": torch.tensor(3, dtype=torch.int64),
            "mask": torch.rand(5, generator=g) > 0.5,
            "empty": torch.empty(0, 3),
        },
        "single": {f"layer{i}.weight": torch.randn(i + 1, 3, generator=g) for i in range(6)},
    }


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (file bytes, {tensor name: tensor}) for files from both writers."""
    d = tmp_path_factory.mktemp("bases")
    out = {}
    for name, sd in base_state_dicts().items():
        p = str(d / f"ops_{name}.flashpack")
        flashpack_ops.save_file(sd, p)
        out[f"ops_{name}"] = p, sd
    try:
        from flashpack.serialization import pack_to_file as reference_pack
    except ImportError:
        reference_pack = None
    if reference_pack is not None:
        for name, sd in base_state_dicts().items():
            p = str(d / f"ref_{name}.flashpack")
            reference_pack({k: v.clone() for k, v in sd.items()}, p, None, name_order=list(sd), silent=True)
            out[f"ref_{name}"] = p, sd
    result = {}
    for name, (p, sd) in out.items():
        with open(p, "rb") as f:
            data = f.read()
        original = {}
        for (tname, dt, shape, offset, _), t in zip(describe(data), flashpack_ops.load_file(p, copy=True).values()):
            assert torch.equal(t, sd[tname])
            original[tname] = (dt, shape, offset, t)
        result[name] = data, original
    return result


CASES_PER_BASE = 1500


@pytest.mark.parametrize("base", ["ops_mixed", "ops_single", "ref_mixed", "ref_single"])
def test_mutated_files_fail_cleanly_or_load_exactly(bases, base, tmp_path):
    if base not in bases:
        pytest.skip("the reference flashpack package is not installed")
    data, original = bases[base]
    rng = random.Random(f"flashpack-{base}")
    outcomes = {"error": 0, "loaded": 0}
    for case in range(CASES_PER_BASE):
        mutate = rng.choice(MUTATIONS)
        mutated, payload_untouched = mutate(rng, data)
        path = str(tmp_path / f"{base}-{case}-{mutate.__name__}.flashpack")
        with open(path, "wb") as f:
            f.write(mutated)
        outcomes[check_load(path, mutated, original if payload_untouched else None)] += 1
        os.unlink(path)
    # Both outcomes must really be exercised, or the oracle tests nothing.
    assert outcomes["error"] > CASES_PER_BASE // 4 and outcomes["loaded"] > CASES_PER_BASE // 20, outcomes


def test_duplicate_keys_are_read_as_the_reference_reads_them(tmp_path, bases):
    """Python's json, which the reference reads footers with, keeps the last of two equal
    keys; a reader keeping the first would load other bytes from the same file."""
    data, original = bases["ops_single"]
    payload, footer = split(data)
    meta = json.loads(footer)
    first, second = meta["index"][0], meta["index"][1]
    # Entry 0 claims entry 1's offset, second; same length, so the file stays valid.
    meta["index"][1] = dict(second, shape=first["shape"], length=first["length"])
    meta["index"][0] = Duplicates(list(first.items()) + [("offset", second["offset"])])
    path = str(tmp_path / "dup.flashpack")
    with open(path, "wb") as f:
        f.write(assemble(payload, dumps(meta).encode()))
    loaded = flashpack_ops.load_file(path)
    name0, name1 = first["name"], second["name"]
    assert as_bytes(loaded[name0]) == as_bytes(loaded[name1])
    assert as_bytes(loaded[name0]) == data[second["offset"] * 4 : (second["offset"] + first["length"]) * 4]
    reference = pytest.importorskip("flashpack.deserialization")
    ref = reference.revert_from_file(path)
    assert as_bytes(ref[name0]) == as_bytes(loaded[name0])


def test_empty_tensor_with_overflowing_strides_is_refused(tmp_path):
    """A zero in the shape makes the tensor empty, but torch still computes its strides and
    refuses any past 2^63: the footer check must catch it and name the file."""
    footer = json.dumps({"format": "flashpack_v3", "target_dtype": "float32", "total_elems": 1,
                         "index": [{"name": "x", "shape": [0, 2**62, 2**62], "offset": 0, "length": 0}]})
    path = str(tmp_path / "strides.flashpack")
    with open(path, "wb") as f:
        f.write(assemble(b"\0" * 4, footer.encode()))
    with pytest.raises(ValueError, match=r"strides\.flashpack.*index entry 'x' has shape \[0, 4611686018427387904, "
                                         r"4611686018427387904\], too large"):
        flashpack_ops.load_file(path)


def test_fuzz_corpus_replays_cleanly():
    """Every seed loads; every input that once broke the loader (fuzz/corpus/load/regress_*)
    now ends in a named error or an exact load."""
    files = sorted(os.listdir(CORPUS))
    assert any(f.startswith("regress_") for f in files)
    for name in files:
        path = os.path.join(CORPUS, name)
        with open(path, "rb") as f:
            data = f.read()
        outcome = check_load(path, data)
        if not name.startswith("regress_"):
            assert outcome == "loaded", name


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def _mappings():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_failing_loads_leak_no_descriptors_or_mappings(tmp_path, bases):
    """Thousands of loads that fail at every stage (open, trailer, footer, bounds) leave the
    process with as many open files and memory mappings as before."""
    data, _ = bases["ops_mixed"]
    payload, footer = split(data)
    meta = json.loads(footer)
    meta["index"][1]["offset"] = 10**9
    hostile = {
        "missing": None,
        "directory": "dir",
        "short": data[:10],
        "no_magic": data[:-1],
        "bad_length": payload + footer + struct.pack("<Q", 2**40) + MAGIC,
        "bad_json": assemble(payload, footer[:-2]),
        "out_of_bounds": assemble(payload, json.dumps(meta).encode()),
        "truncated_payload": assemble(payload[:100], footer),
    }
    paths = []
    for name, content in hostile.items():
        p = tmp_path / f"{name}.flashpack"
        if content == "dir":
            p.mkdir()
        elif content is not None:
            p.write_bytes(content)
        paths.append(str(p))
    good = str(tmp_path / "good.flashpack")
    with open(good, "wb") as f:
        f.write(data)

    def one_round():
        for p in paths:
            for copy in (False, True):
                with pytest.raises((ValueError, RuntimeError, FileNotFoundError)):
                    flashpack_ops.load_file(p, copy=copy)
        with pytest.raises((ValueError, RuntimeError, FileNotFoundError)):
            flashpack_ops.read_metadata(paths[3])
        flashpack_ops.load_file(good)  # dropped at once: its mapping must go too

    one_round()  # first-use allocations (thread pools, caches) happen before counting
    fds, maps = _open_fds(), _mappings()
    rounds = 150
    for _ in range(rounds):
        one_round()
    assert _open_fds() == fds
    # A leak keeps at least one mapping per round (17 loads each); the allocators may map an
    # arena or two of their own meanwhile (Python's, malloc's), which is no leak.
    assert _mappings() - maps < rounds // 10
