"""The on-store format: names, key encoding, strict index validation, integrity checks."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudckpt import Checkpoint, Variable
from cloudckpt.errors import CheckpointFormatError, CheckpointNotFoundError, ChecksumError
from cloudckpt.format import (
    FORMAT_VERSION,
    CheckpointIndex,
    decode_index,
    decode_segment,
    encode_index,
    encode_segment,
)


def write_sample(tmp_path: Path) -> str:
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "v": Variable(np.ones(5)), "s": "x", "n": 1.5}
    return Checkpoint(state=state).write(tmp_path / "c")


def index_doc(tmp_path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tmp_path / "c.index").read_bytes())
    return doc


def decode(doc: object) -> CheckpointIndex:
    return decode_index(json.dumps(doc).encode(), "c", "mem://c.index")


# ---------------------------------------------------------------------- keys
@given(st.one_of(st.text(max_size=30), st.integers(), st.booleans(), st.none(),
                 st.floats(allow_nan=False)))
def test_segment_round_trip(key: object) -> None:
    segment = encode_segment(key)
    assert "/" not in segment and segment
    decoded = decode_segment(segment)
    assert decoded == key and type(decoded) is type(key)


def test_segments_are_readable() -> None:
    assert encode_segment("kernel") == "kernel"
    assert encode_segment(0) == "#0"
    assert encode_segment("0") == "0"
    assert encode_segment("a/b") == "a~1b"


# ---------------------------------------------------------------------- validation
def test_valid_index_round_trips(tmp_path: Path) -> None:
    write_sample(tmp_path)
    raw = (tmp_path / "c.index").read_bytes()
    index = decode_index(raw, "c", "x")
    assert decode_index(encode_index(index), "c", "x") == index
    assert index.version == FORMAT_VERSION


def test_unknown_version_is_a_clear_error(tmp_path: Path) -> None:
    write_sample(tmp_path)
    doc = index_doc(tmp_path)
    doc["version"] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointFormatError, match=rf"format version {FORMAT_VERSION + 1}.*upgrade cloudckpt"):
        decode(doc)
    (tmp_path / "c.index").write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match="upgrade"):
        Checkpoint(state={}).read(tmp_path / "c")


def _mutations() -> list[tuple[str, Any]]:
    def chunk(doc: dict[str, Any]) -> dict[str, Any]:
        chunk_doc: dict[str, Any] = doc["entries"]["state/w"]["chunks"][0]
        return chunk_doc

    return [
        ("offset past object", lambda d: chunk(d).update(offset=10**6)),
        ("negative offset", lambda d: chunk(d).update(offset=-1)),
        ("bool as int", lambda d: chunk(d).update(offset=True)),
        ("length mismatch", lambda d: chunk(d).update(length=7)),
        ("crc too big", lambda d: chunk(d).update(crc32c=2**32)),
        ("object index out of range", lambda d: chunk(d).update(object=5)),
        ("chunk outside array", lambda d: chunk(d).update(start=[1, 0])),
        ("absurd shape", lambda d: d["entries"]["state/w"].update(shape=[2**40, 2**40])),
        ("object dtype", lambda d: d["entries"]["state/w"].update(dtype="O")),
        ("unknown dtype", lambda d: d["entries"]["state/w"].update(dtype="float33")),
        ("structured dtype", lambda d: d["entries"]["state/w"].update(dtype="[('a', '<i4')]")),
        ("escaping object", lambda d: d["objects"][0].update(name="../other.data-00000-of-00001.abc")),
        ("other checkpoint's data", lambda d: d["objects"][0].update(name="d.data-00000-of-00001.abc")),
        ("absolute object", lambda d: d["objects"][0].update(name="/etc/passwd")),
        ("orphan entry", lambda d: d["entries"].update({"zzz": {"kind": "value", "type": "int", "value": 1}})),
        ("missing child", lambda d: d["entries"]["state"]["children"].append("ghost")),
        ("no root", lambda d: d["entries"].pop("")),
        ("bad kind", lambda d: d["entries"]["state/s"].update(kind="pickle")),
        ("value type mismatch", lambda d: d["entries"]["state/s"].update(value=3)),
        ("unknown adapter", lambda d: d["entries"]["state"].update(adapter="exec")),
        ("extra field", lambda d: d.update(code="import os")),
        ("wrong name", lambda d: d.update(name="d")),
        ("entries not a dict", lambda d: d.update(entries=[])),
        ("bad segment", lambda d: d["entries"][""]["children"].append("~9")),
        ("not a list", lambda d: d.update(objects="x")),
        ("size negative", lambda d: d["objects"][0].update(size=-1)),
        ("list as pytype", lambda d: d["entries"]["state/w"].update(pytype=["ndarray"])),
        ("list as node type", lambda d: d["entries"]["state"].update(type=["dict"])),
        ("list as adapter", lambda d: d["entries"]["state"].update(adapter=["torch"])),
        ("block count mismatch", lambda d: chunk(d).update(blocks={"size": 4096, "crc32c": "AAAAAAAAAAA="})),
        ("blocks not base64", lambda d: chunk(d).update(blocks={"size": 4096, "crc32c": "!!!!"})),
        ("block size tiny", lambda d: chunk(d).update(blocks={"size": 16, "crc32c": "AAAAAA=="})),
        ("block size odd", lambda d: chunk(d).update(blocks={"size": 4097, "crc32c": "AAAAAA=="})),
        ("blocks extra field", lambda d: chunk(d).update(blocks={"size": 4096, "crc32c": "AAAAAA==", "x": 1})),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_hostile_index_is_refused(tmp_path: Path, what: str, mutate: Any) -> None:
    write_sample(tmp_path)
    doc = index_doc(tmp_path)
    mutate(doc)
    with pytest.raises(CheckpointFormatError):
        decode(doc)


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[]", b"null", b'{"format": 1}', b"[" * 100000,
                                 b'{"version": NaN}', b"{" * 5000])
def test_garbage_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(CheckpointFormatError):
        decode_index(raw, "c", "x")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values)
def test_fuzz_random_documents(doc: object) -> None:
    with contextlib.suppress(CheckpointFormatError):
        decode(doc)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_valid_index(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    base = _valid_doc(tmp_path_factory)
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate_somewhere(doc, data)
    with contextlib.suppress(CheckpointFormatError):
        decode(doc)


_VALID: dict[str, Any] = {}


def _valid_doc(factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not _VALID:
        path = factory.mktemp("valid")
        write_sample(path)
        _VALID.update(index_doc(path))
    return _VALID


def _mutate_somewhere(doc: Any, data: st.DataObject) -> None:
    """Replace one randomly chosen node of the JSON tree with a random JSON value."""
    node = doc
    while True:
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            key = data.draw(st.integers(0, len(node) - 1))
        else:
            return
        child = node[key]
        if not isinstance(child, (dict, list)) or not child or data.draw(st.booleans()):
            node[key] = data.draw(json_values)
            return
        node = child


# ---------------------------------------------------------------------- integrity on read
def test_flipped_data_byte_raises_checksum_error(tmp_path: Path) -> None:
    write_sample(tmp_path)
    data_file = next(tmp_path.glob("c.data-*"))
    raw = bytearray(data_file.read_bytes())
    index = decode_index((tmp_path / "c.index").read_bytes(), "c", "x")
    w_offset = index.entries["state/w"].chunks[0].offset  # type: ignore[union-attr]
    raw[w_offset + 5] ^= 0x01
    data_file.write_bytes(bytes(raw))
    target = {"w": np.zeros((3, 4), np.float32), "v": Variable(np.zeros(5)), "s": "", "n": 0.0}
    with pytest.raises(ChecksumError, match=r"'state/w'.*c\.data-00000-of-00001") as info:
        Checkpoint(state=target).read(tmp_path / "c")
    assert "the live state is now partial" in str(info.value) and "state/w" in info.value.overwritten
    assert set(info.value.overwritten) <= {"save_counter", "state/w", "state/v"}  # only in-place targets


@pytest.mark.parametrize("position", range(0, 12 * 4 + 5 * 8 + 8))
def test_every_flipped_byte_is_detected(tmp_path: Path, position: int) -> None:
    write_sample(tmp_path)
    data_file = next(tmp_path.glob("c.data-*"))
    raw = bytearray(data_file.read_bytes())
    raw[position] ^= 0x80
    data_file.write_bytes(bytes(raw))
    target = {"w": np.zeros((3, 4), np.float32), "v": Variable(np.zeros(5)), "s": "", "n": 0.0}
    with pytest.raises(ChecksumError):
        Checkpoint(state=target).read(tmp_path / "c")


def test_truncated_data_object(tmp_path: Path) -> None:
    write_sample(tmp_path)
    data_file = next(tmp_path.glob("c.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:10])
    with pytest.raises(CheckpointFormatError, match="shorter"):
        Checkpoint(state={"w": np.zeros((3, 4), np.float32), "v": Variable(np.zeros(5)), "s": "",
                          "n": 0.0}).read(tmp_path / "c")


def test_deleted_data_object(tmp_path: Path) -> None:
    write_sample(tmp_path)
    next(tmp_path.glob("c.data-*")).unlink()
    with pytest.raises(CheckpointNotFoundError, match="deleted while reading"):
        Checkpoint(state={"w": np.zeros((3, 4), np.float32), "v": Variable(np.zeros(5)), "s": "",
                          "n": 0.0}).read(tmp_path / "c")


# ---------------------------------------------------------------------- round-trip property
keys = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.booleans(), st.none())
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
arrays = st.builds(lambda n, kind: np.arange(n, dtype=kind), st.integers(0, 5),
                   st.sampled_from(["float32", "int16", "uint8", "complex64"]))
trees = st.recursive(scalars | arrays, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=12)


def same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            same(a[k], b[k]) and type(k) is type(next(x for x in b if x == k)) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(
            same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return type(a) is type(b) and a == b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_any_nested_structure_round_trips(tmp_path_factory: pytest.TempPathFactory, tree: object) -> None:
    from cloudckpt import load_variable

    directory = tmp_path_factory.mktemp("tree")
    path = Checkpoint(state=[tree]).write(directory / "c")
    assert same(load_variable(path, "state")[0], tree)


def test_oversized_index_is_refused_before_it_is_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudckpt.format import index_fetch as index_store
    from cloudckpt.storage import resolve

    path = Checkpoint(v=Variable(np.arange(4.0))).write(str(tmp_path / "ck"))
    size = (tmp_path / "ck.index").stat().st_size
    monkeypatch.setattr(index_store, "MAX_INDEX_BYTES", size - 1)
    fetched: list[str] = []
    storage = resolve(path).storage
    real_get = storage.get
    monkeypatch.setattr(storage, "get", lambda key, *a: fetched.append(key) or real_get(key, *a))
    with pytest.raises(CheckpointFormatError, match=f"{size} bytes, over the {size - 1}-byte limit"):
        Checkpoint(v=Variable(np.zeros(4))).read(path)
    assert fetched == []


def test_restoring_a_directory_says_it_is_one(tmp_path: Path) -> None:
    Checkpoint(v=Variable(1.0)).save(str(tmp_path / "run" / "ckpt"))
    with pytest.raises(CheckpointNotFoundError, match=r"is a directory holding 1 checkpoint index.*ckpt-1"):
        Checkpoint(v=Variable(0.0)).restore(str(tmp_path / "run"))


def test_large_chunks_record_block_checksums_that_round_trip(tmp_path: Path) -> None:
    from cloudckpt.storage.checksum import CRC_BLOCK, crc32c_of

    big = np.random.default_rng(1).standard_normal(CRC_BLOCK // 8 * 2 + 5)  # 2 MiB + 40 bytes: 3 blocks
    Checkpoint(big=big).write(str(tmp_path / "c"))
    index = decode_index((tmp_path / "c.index").read_bytes(), "c", "x")
    (chunk,) = index.entries["big"].chunks  # type: ignore[union-attr]
    raw = memoryview(big).cast("B")
    assert chunk.block_size == CRC_BLOCK
    assert chunk.block_crc32c == tuple(crc32c_of([raw[i:i + CRC_BLOCK]]) for i in range(0, raw.nbytes, CRC_BLOCK))
    assert chunk.crc32c == crc32c_of([raw])  # combined from the blocks, equal to one pass
    assert decode_index(encode_index(index), "c", "x") == index


def test_a_huge_array_claimed_in_a_small_object_is_refused_before_allocating(tmp_path: Path) -> None:
    """The index's recorded sizes lie too: only the object's real size (HEAD) tells, before np.empty."""
    path = Checkpoint(big=np.arange(4.0)).write(str(tmp_path / "c"))
    doc = json.loads((tmp_path / "c.index").read_text())
    entry = doc["entries"]["big"]
    entry["shape"] = [2**40 // 8]  # 1 TiB of float64
    chunk = entry["chunks"][0]
    chunk.update(length=2**40, shape=[2**40 // 8])
    chunk.pop("blocks", None)
    doc["objects"][chunk["object"]]["size"] = 2**41
    (tmp_path / "c.index").write_text(json.dumps(doc))
    import cloudckpt

    with pytest.raises(CheckpointFormatError, match=r"cannot read 'big'.*has \d+ bytes.*nothing was allocated"):
        cloudckpt.load_variable(path, "big")
    with pytest.raises(CheckpointFormatError, match="cannot read 'big'"):
        cloudckpt.load_checkpoint(path).get_tensor("")  # the whole tree, materialised
