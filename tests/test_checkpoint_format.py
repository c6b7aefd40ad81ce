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


# ---------------------------------------------------------------------- block CRC byte order (issue 23)
# Versions 1 and 2 wrote a chunk list's ``blocks.crc32c`` big-endian and a grid's little-endian;
# version 3 writes both little-endian. Each version is read with its own order.
_BLOCK = 4096  # the smallest block size the format allows: small data, several blocks per chunk
_DATA = "c.data-00000-of-00001.0123456789abcdef"


def _handmade(tmp_path: Path, *, grid: bool = True) -> tuple[CheckpointIndex, dict[str, np.ndarray]]:
    """A checkpoint written by hand at ``tmp_path/c`` (its index left to the caller): ``flat``, one
    chunk of 5 blocks (a chunk list), and ``grid``, 64 row chunks of 2 blocks each (a grid)."""
    from cloudckpt.format import ArrayEntry, Chunk, DataObject, NodeEntry
    from cloudckpt.format.chunks import ChunkGrid
    from cloudckpt.storage.checksum import crc32c_with_blocks

    arrays = {"flat": np.arange(5000, dtype=np.float32)}
    if grid:
        arrays["grid"] = np.random.default_rng(3).standard_normal((64, 1536)).astype(np.float32)
    data = bytearray()
    entries: dict[str, Any] = {"": NodeEntry("object", tuple(arrays))}

    def chunk(raw: bytes, start: tuple[int, ...], shape: tuple[int, ...]) -> Chunk:
        crc, blocks = crc32c_with_blocks(memoryview(raw), _BLOCK)
        assert len(blocks) > 1
        out = Chunk(0, len(data), len(raw), crc, start, shape, _BLOCK, blocks)
        data.extend(raw)
        return out

    entries["flat"] = ArrayEntry("float32", (5000,), "ndarray", (chunk(arrays["flat"].tobytes(), (0,), (5000,)),))
    if grid:
        rows = tuple(chunk(arrays["grid"][r].tobytes(), (r, 0), (1, 1536)) for r in range(64))
        entries["grid"] = ArrayEntry("float32", (64, 1536), "ndarray", rows)
    (tmp_path / _DATA).write_bytes(bytes(data))
    index = CheckpointIndex("c", entries, (DataObject(_DATA, len(data)),))
    if grid:
        assert isinstance(json.loads(encode_index(index))["entries"]["grid"].get("grid"), dict)
        assert not isinstance(index.entries["grid"].chunks, ChunkGrid)  # type: ignore[union-attr]
    return index, arrays


def _as_written(index: CheckpointIndex, version: int, chunks: str, grid: str) -> dict[str, Any]:
    """``index`` as a document of format ``version``, its ``blocks.crc32c`` packed in byte order ``chunks``
    (``"<"`` or ``">"``) in the chunk lists and ``grid`` in the grids - set from the block CRC32Cs
    themselves, not from what this cloudckpt's encoder chose."""
    import base64

    doc: dict[str, Any] = json.loads(encode_index(index))
    decoded = decode_index(encode_index(index), index.name, "x")  # the CRCs in the document's order

    def packed(crcs: list[int], order: str) -> str:
        return base64.b64encode(np.array(crcs, dtype=f"{order}u4").tobytes()).decode()

    for key, entry in doc["entries"].items():
        if entry["kind"] != "array":
            continue
        chunk_list = list(decoded.entries[key].chunks)  # type: ignore[union-attr]
        for raw, chunk in zip(entry.get("chunks", []), chunk_list, strict=False):
            if "blocks" in raw:
                raw["blocks"]["crc32c"] = packed(list(chunk.block_crc32c), chunks)
        if "blocks" in entry.get("grid", {}):
            entry["grid"]["blocks"]["crc32c"] = packed([b for c in chunk_list for b in c.block_crc32c], grid)
    doc["version"] = version
    return doc


def _block_words(b64: str, order: str) -> list[int]:
    import base64

    return np.frombuffer(base64.b64decode(b64), dtype=f"{order}u4").tolist()


def _partial_reads(tmp_path: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Read a box inside one block of each array: verified against that block's CRC32C alone."""
    from cloudckpt.format import ArrayEntry
    from cloudckpt.format.index_fetch import load_index
    from cloudckpt.restoring.array_reads import read_arrays
    from cloudckpt.restoring.buffers import ReadTarget
    from cloudckpt.storage.local import LocalStorage

    storage = LocalStorage(tmp_path)
    index = load_index(storage, name)
    boxes = {"flat": ((4500,), (100,)), "grid": ((3, 1100), (1, 100))}
    targets, dest = [], {}
    for key, (start, extent) in boxes.items():
        entry = index.entries.get(key)
        if isinstance(entry, ArrayEntry):
            dest[key] = np.zeros(extent, dtype=np.float32)
            targets.append(ReadTarget(key, entry, dest[key], live=False, start=start))
    read_arrays(storage, index, targets)
    for key, (start, extent) in boxes.items():
        if key in dest:
            box = tuple(slice(a, a + n) for a, n in zip(start, extent, strict=True))
            np.testing.assert_array_equal(dest[key], arrays[key][box])


def _restores_and_verifies(tmp_path: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    import cloudckpt
    from cloudckpt.storage.local import LocalStorage
    from cloudckpt.tools.verify import verify_checkpoint

    for key, value in arrays.items():
        np.testing.assert_array_equal(cloudckpt.load_variable(str(tmp_path / name), key), value)
    _partial_reads(tmp_path, name, arrays)
    verdict = verify_checkpoint(LocalStorage(tmp_path), name)
    assert verdict.intact and verdict.arrays == len(arrays), verdict.findings


def test_new_writes_are_version_3_with_little_endian_block_crcs_in_chunk_lists_and_grids(tmp_path: Path) -> None:
    from cloudckpt.storage.checksum import CRC_BLOCK, crc32c_of

    assert FORMAT_VERSION == 3
    index, arrays = _handmade(tmp_path)
    doc = json.loads(encode_index(index))
    assert doc["version"] == 3
    flat = doc["entries"]["flat"]["chunks"][0]["blocks"]
    assert _block_words(flat["crc32c"], "<") == list(index.entries["flat"].chunks[0].block_crc32c)  # type: ignore
    grid = doc["entries"]["grid"]["grid"]["blocks"]
    assert _block_words(grid["crc32c"], "<") == [b for c in index.entries["grid"].chunks  # type: ignore[union-attr]
                                                  for b in c.block_crc32c]
    (tmp_path / "c.index").write_text(json.dumps(doc))
    _restores_and_verifies(tmp_path, "c", arrays)
    # a real save too: the writer's own index
    big = np.random.default_rng(1).standard_normal(CRC_BLOCK // 8 * 2 + 5)  # 3 blocks
    Checkpoint(big=big).write(str(tmp_path / "w"))
    written = json.loads((tmp_path / "w.index").read_bytes())
    raw = memoryview(big).cast("B")
    assert written["version"] == 3
    assert _block_words(written["entries"]["big"]["chunks"][0]["blocks"]["crc32c"], "<") == [
        crc32c_of([raw[i:i + CRC_BLOCK]]) for i in range(0, raw.nbytes, CRC_BLOCK)]


@pytest.mark.parametrize("version", [1, 2])
def test_earlier_versions_read_big_endian_chunk_blocks_and_little_endian_grid_blocks(tmp_path: Path,
                                                                                     version: int) -> None:
    """A version-2 index as version 2 wrote it (and a version-1 one: chunk lists only) restores and verifies."""
    index, arrays = _handmade(tmp_path, grid=version >= 2)
    doc = _as_written(index, version, chunks=">", grid="<")  # what versions 1 and 2 wrote
    assert _block_words(doc["entries"]["flat"]["chunks"][0]["blocks"]["crc32c"], ">") == list(
        index.entries["flat"].chunks[0].block_crc32c)  # type: ignore[union-attr]
    (tmp_path / "c.index").write_text(json.dumps(doc))
    back = decode_index((tmp_path / "c.index").read_bytes(), "c", "x")
    assert back.version == version
    for key in arrays:  # the same block CRC32Cs as written (the grid's come back as columns)
        assert list(back.entries[key].chunks) == list(index.entries[key].chunks)  # type: ignore[union-attr]
    _restores_and_verifies(tmp_path, "c", arrays)


@pytest.mark.parametrize(("version", "layout"), [(3, "chunks"), (3, "grid"), (2, "grid")])
def test_block_crcs_in_the_wrong_byte_order_fail_their_crc_check(tmp_path: Path, version: int, layout: str) -> None:
    """A version-3 index with big-endian block CRCs (either layout), or a version-2 one whose grid blocks
    are big-endian, is caught: a partial read raises ``ChecksumError``, verify reports the blocks."""
    from cloudckpt.storage.local import LocalStorage
    from cloudckpt.tools.verify import verify_checkpoint

    index, arrays = _handmade(tmp_path)
    right = {"chunks": "<" if version >= 3 else ">", "grid": "<"}  # the order each layout has in ``version``
    wrong = {"<": ">", ">": "<"}[right[layout]]
    doc = _as_written(index, version, **{**right, layout: wrong})
    (tmp_path / "c.index").write_text(json.dumps(doc))
    key = "flat" if layout == "chunks" else "grid"
    with pytest.raises(ChecksumError, match=rf"'{key}'"):
        _partial_reads(tmp_path, "c", {key: arrays[key]})
    findings = verify_checkpoint(LocalStorage(tmp_path), "c").findings
    assert findings and all(f.kind == "crc-mismatch" and f.key == key for f in findings), findings
    assert "block CRC32C(s)" in findings[0].detail


def test_a_version_2_index_with_little_endian_chunk_blocks_fails_its_crc_check(tmp_path: Path) -> None:
    """Version 3's chunk blocks under version 2 are read with version 2's big-endian order: wrong."""
    from cloudckpt.storage.local import LocalStorage
    from cloudckpt.tools.verify import verify_checkpoint

    index, arrays = _handmade(tmp_path, grid=False)
    doc = _as_written(index, 2, chunks="<", grid="<")
    (tmp_path / "c.index").write_text(json.dumps(doc))
    with pytest.raises(ChecksumError, match="'flat'"):
        _partial_reads(tmp_path, "c", arrays)
    assert not verify_checkpoint(LocalStorage(tmp_path), "c").intact


@pytest.mark.parametrize("ranged", [True, False])
def test_a_copied_version_2_checkpoint_is_rewritten_as_version_3(tmp_path: Path, ranged: bool) -> None:
    """``cp`` re-encodes the index: the copy is version 3, its chunk blocks converted to little-endian."""
    from cloudckpt.storage.local import LocalStorage
    from cloudckpt.tools.copy_one import copy_checkpoint

    index, arrays = _handmade(tmp_path)
    doc = _as_written(index, 2, chunks=">", grid="<")
    (tmp_path / "c.index").write_text(json.dumps(doc))
    copy_checkpoint(LocalStorage(tmp_path), "c", LocalStorage(tmp_path), "d", force=False, reread=True, ranged=ranged)
    copied = json.loads((tmp_path / "d.index").read_bytes())
    assert copied["version"] == 3
    crcs = list(index.entries["flat"].chunks[0].block_crc32c)  # type: ignore[union-attr]
    assert _block_words(copied["entries"]["flat"]["chunks"][0]["blocks"]["crc32c"], "<") == crcs  # converted
    assert copied["entries"]["grid"]["grid"]["blocks"] == doc["entries"]["grid"]["grid"]["blocks"]
    _restores_and_verifies(tmp_path, "d", arrays)
    _restores_and_verifies(tmp_path, "c", arrays)  # the source is untouched, still version 2


@pytest.mark.parametrize("replacement", ["longer", "shorter"])
def test_an_index_replaced_between_its_head_and_its_get_is_read_again(tmp_path: Path, replacement: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer replacing ``last`` between the HEAD that sizes the read and the GET: the read
    got the first bytes of a longer index (malformed JSON) or ran short of a shorter one. Neither
    is damage; the reader HEADs again, sees a new version and reads the new index."""
    from cloudckpt.storage import resolve

    path = str(tmp_path / "last")
    small, large = {"v": Variable(np.arange(2.0))}, {f"w{i}": Variable(np.full(3, float(i))) for i in range(20)}
    first, second = (small, large) if replacement == "longer" else (large, small)
    Checkpoint(**first).write(path)
    storage = resolve(path).storage
    real_get = storage.get
    replaced: list[bool] = []

    def get_after_a_replace(key: str, *args: Any) -> bytes:
        if key.endswith(".index") and not replaced:
            replaced.append(True)
            Checkpoint(**second).write(path)  # lands after the reader's HEAD, before its GET
        return real_get(key, *args)

    monkeypatch.setattr(storage, "get", get_after_a_replace)
    dest = {k: Variable(np.zeros_like(v.numpy())) for k, v in second.items()}
    Checkpoint(**dest).read(path).assert_consumed()
    assert replaced and all(np.array_equal(dest[k].numpy(), second[k].numpy()) for k in second)


def test_a_malformed_index_that_stays_the_same_is_still_an_error(tmp_path: Path) -> None:
    """The reread is for a replaced index only: an unchanged damaged one is reported, read once more at most."""
    path = str(tmp_path / "ck")
    Checkpoint(v=Variable(np.arange(4.0))).write(path)
    index = tmp_path / "ck.index"
    index.write_bytes(index.read_bytes()[:-7])
    with pytest.raises(CheckpointFormatError, match="not valid UTF-8 JSON"):
        Checkpoint(v=Variable(np.zeros(4))).read(path)
