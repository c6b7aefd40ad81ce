"""Reading TensorFlow's own checkpoints (TensorBundle) without TensorFlow.

The fixtures under tests/tf_fixtures/data were written by TensorFlow 2.21 (make_fixtures.py)
together with the values TensorFlow itself reads back; every tensor must decode to exactly
those. Hostile and unusual bundles (big-endian, lying sizes, broken tables) are made by
tests/tf_bundle_writer.py.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tf_bundle_writer as tfw
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cloudckpt
from cloudckpt.errors import CheckpointFormatError, CheckpointNotFoundError, ChecksumError, CloudCkptError
from cloudckpt.storage import open_storage
from cloudckpt.storage.local import LocalStorage
from cloudckpt.tfbundle import Bundle, is_bundle_index
from cloudckpt.tfbundle.entries import DTYPES

FIXTURES = Path(__file__).parent / "tf_fixtures" / "data"
CHECKPOINTS = ["basic/ckpt-1", "optimizer/ckpt-1", "manager/ckpt-2", "manager/ckpt-3", "manager/ckpt-4",
               "sharded/ckpt-1", "partitioned/model.ckpt"]
_NUMPY = {name: dtype for name, dtype in DTYPES.values()}


def expected(checkpoint: str) -> dict[str, dict[str, Any]]:
    keys: dict[str, dict[str, Any]] = json.loads((FIXTURES / f"{checkpoint}.expected.json").read_text())["keys"]
    return keys


def expected_array(doc: dict[str, Any]) -> np.ndarray:
    """What TensorFlow read back, rebuilt as an array of the tensor's own dtype."""
    value, shape = doc["value"], tuple(doc["shape"])
    if doc["dtype"] == "string":
        flat = np.array(value, dtype=object).reshape(-1)
        out = np.empty(flat.size, dtype=object)
        out[:] = [text.encode("latin-1") for text in flat]
        return out.reshape(shape)
    dtype = _NUMPY[doc["dtype"]]
    if dtype.kind == "c":
        pairs = np.array(value, dtype=np.float64).reshape((*shape, 2))
        return (pairs[..., 0] + 1j * pairs[..., 1]).astype(dtype)
    raw = np.array(value, dtype=object if dtype.kind in "iu" else np.float64).reshape(shape)
    return raw.astype(dtype)


def assert_same(actual: Any, want: np.ndarray, what: str) -> None:
    actual = np.array(actual, dtype=object) if isinstance(actual, bytes) else np.asarray(actual)
    assert actual.shape == want.shape, what
    if want.dtype == object:
        assert actual.dtype == object and actual.reshape(-1).tolist() == want.reshape(-1).tolist(), what
        return
    assert actual.dtype == want.dtype, what
    assert actual.tobytes() == want.tobytes(), what  # bit for bit: NaN payloads, -0.0


def bundle_at(path: Path) -> Bundle:
    storage = open_storage(path.parent)
    return Bundle(storage, path.name, storage.get(path.name + ".index"))


# ---------------------------------------------------------------------------- real TensorFlow output
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_every_tensor_decodes_to_what_tensorflow_reads(checkpoint: str) -> None:
    want = expected(checkpoint)
    bundle = bundle_at(FIXTURES / checkpoint)
    listed = {t.key: t for t in bundle.tensors()}
    assert set(listed) == set(want) - {"_CHECKPOINTABLE_OBJECT_GRAPH"}
    values = bundle.read(sorted(listed))
    for key, doc in want.items():
        if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        assert listed[key].dtype == doc["dtype"] and list(listed[key].shape) == doc["shape"], key
        assert_same(values[key], expected_array(doc), key)


def test_object_paths_are_the_names_the_user_wrote() -> None:
    names = {t.name: t.key for t in bundle_at(FIXTURES / "basic" / "ckpt-1").tensors()}
    assert names["model/layers/0/kernel"] == "model/layers/0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert names["model/config/a~1b"] == "model/config/a.Sb/.ATTRIBUTES/VARIABLE_VALUE"  # local name "a/b"
    assert names["model/config/x.y"] == "model/config/x..y/.ATTRIBUTES/VARIABLE_VALUE"
    assert names["save_counter"] == "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
    assert all("/.ATTRIBUTES/" not in name for name in names)

    optimizer = {t.name for t in bundle_at(FIXTURES / "optimizer" / "ckpt-1").tensors()}
    assert "model/layers/1/bias/.OPTIMIZER_SLOT/optimizer/m" in optimizer
    assert {"optimizer/beta1_power", "optimizer/beta2_power", "model/layers/0/kernel"} <= optimizer
    # A V1 Saver checkpoint has no object graph: its names are its keys; slices are not listed.
    assert {t.name for t in bundle_at(FIXTURES / "partitioned" / "model.ckpt").tensors()} == {"part", "long", "plain"}


def test_public_reader_api_reads_tensorflow_checkpoints() -> None:
    path = str(FIXTURES / "optimizer" / "ckpt-1")
    listed = dict(cloudckpt.list_variables(path))
    assert listed["model/layers/0/kernel"] == [3, 4] and listed["save_counter"] == []
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" not in listed
    want = expected("optimizer/ckpt-1")
    raw = "model/layers/0/kernel/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE"
    slot = cloudckpt.load_variable(path, "model/layers/0/kernel/.OPTIMIZER_SLOT/optimizer/v")
    assert_same(slot, expected_array(want[raw]), "slot")
    assert_same(cloudckpt.load_variable(path, raw), expected_array(want[raw]), "by raw key")
    counter = cloudckpt.load_variable(path, "save_counter")
    assert isinstance(counter, np.int64) and counter == 1  # a 0-d tensor comes back as TF returns it
    tree = cloudckpt.load_variable(path, "model/layers")
    assert sorted(tree) == ["0", "1"] and sorted(tree["1"]) == ["bias", "kernel"]
    assert_same(tree["1"]["bias"], expected_array(want["model/layers/1/bias/.ATTRIBUTES/VARIABLE_VALUE"]), "tree")
    everything = cloudckpt.load_variable(path, "")  # the root: every tensor, slots left out
    assert sorted(everything) == ["model", "optimizer", "save_counter"]
    assert sorted(everything["model"]["config"]) == ["a/b", "x.y"]  # the local names, decoded
    assert sorted(everything["optimizer"]) == ["beta1_power", "beta2_power"]

    reader = cloudckpt.load_checkpoint(FIXTURES / "basic" / "ckpt-1")
    assert reader.get_tensor("text") == b"hello, checkpoint"
    assert reader.get_variable_to_dtype_map()["bf16"] == np.dtype(ml_dtypes.bfloat16)
    assert reader.get_variable_to_dtype_map()["texts"] == np.dtype(object)
    assert reader.has_tensor("model/config/a~1b") and reader.has_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")
    assert not reader.has_tensor("model/config") and reader.metadata == {}
    assert isinstance(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"), bytes)
    with pytest.raises(KeyError, match="nope"):
        reader.get_tensor("nope")
    with pytest.raises(NotImplementedError, match="get_tensor"):
        reader.restore("f32", np.zeros((3, 5), np.float32))


def test_latest_checkpoint_picks_tensorflows_state_file() -> None:
    latest = cloudckpt.latest_checkpoint(FIXTURES / "manager")
    assert latest is not None and Path(latest) == FIXTURES / "manager" / "ckpt-4"
    assert cloudckpt.load_variable(latest, "step") == 40


def test_format_is_told_by_content_not_name(tmp_path: Path) -> None:
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(FIXTURES / "manager" / f"ckpt-3{suffix}", tmp_path / f"weights{suffix}")
    assert cloudckpt.load_variable(tmp_path / "weights", "step") == 30
    assert is_bundle_index((tmp_path / "weights.index").read_bytes())
    assert not is_bundle_index(b'{"format": "cloudckpt-index"}' + b"\0" * 40 + struct.pack("<Q", tfw.MAGIC))


class RecordingStorage(LocalStorage):
    """Local storage that records every key read."""

    touched: set[str]

    def _head(self, full_key: str) -> Any:
        self.touched.add(full_key)
        return super()._head(full_key)

    def _get_range(self, full_key: str, byte_range: Any) -> bytes:
        self.touched.add(full_key)
        return super()._get_range(full_key, byte_range)

    def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
        self.touched.add(full_key)
        super()._read_into(full_key, offset, outs)


def test_reads_only_the_checkpoints_own_objects(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "sharded", tmp_path / "run")
    (tmp_path / "run" / "ckpt-1.data-00000-of-00004.bak").write_bytes(b"x" * 10)
    storage = RecordingStorage(str(tmp_path / "run"))
    storage.touched = set()
    bundle = Bundle(storage, "ckpt-1", storage.get("ckpt-1.index"))
    bundle.read(bundle.keys)
    names = {Path(k).name for k in storage.touched}
    assert names == {"ckpt-1.index"} | {f"ckpt-1.data-0000{i}-of-00004" for i in range(4)}


# ---------------------------------------------------------------------------- damage
def _copy(name: str, tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / name


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_data_shard_names_the_tensor(tmp_path: Path) -> None:
    run = _copy("basic", tmp_path)
    bundle = bundle_at(run / "ckpt-1")
    shard = run / "ckpt-1.data-00000-of-00001"
    f32 = bundle.entries["f32/.ATTRIBUTES/VARIABLE_VALUE"]
    _flip(shard, f32.offset + 7)
    with pytest.raises(ChecksumError, match="'f32'") as caught:
        cloudckpt.load_variable(run / "ckpt-1", "f32")
    assert caught.value.key == "f32" and caught.value.url is not None and caught.value.url.endswith(shard.name)
    assert cloudckpt.load_variable(run / "ckpt-1", "step") == 42  # the other tensors still read
    texts = bundle.entries["texts/.ATTRIBUTES/VARIABLE_VALUE"]
    for where in (0, texts.size - 3):  # a string length, then a string's bytes
        _flip(shard, texts.offset + where)
        with pytest.raises(ChecksumError, match="'texts'") as caught:
            cloudckpt.load_variable(run / "ckpt-1", "texts")
        assert caught.value.key == "texts"
        _flip(shard, texts.offset + where)


def test_a_flipped_byte_in_a_slice_names_the_partitioned_tensor(tmp_path: Path) -> None:
    run = _copy("sharded", tmp_path)
    bundle = bundle_at(run / "ckpt-1")
    part, _, _ = bundle._slice_entries["w2/.ATTRIBUTES/VARIABLE_VALUE"][-1]
    _flip(run / f"ckpt-1.data-{part.shard:05d}-of-00004", part.offset + 1)
    with pytest.raises(ChecksumError) as caught:
        cloudckpt.load_variable(run / "ckpt-1", "w2")
    assert caught.value.key == "w2"
    assert cloudckpt.load_variable(run / "ckpt-1", "w3").shape == (16, 16)


@pytest.mark.parametrize("keep", [0, 1, 47, 48, 200, -1])
def test_a_truncated_index_is_a_format_error(tmp_path: Path, keep: int) -> None:
    run = _copy("basic", tmp_path)
    index = run / "ckpt-1.index"
    data = index.read_bytes()
    index.write_bytes(data[:keep])
    with pytest.raises(CheckpointFormatError):
        cloudckpt.list_variables(run / "ckpt-1")


def test_a_truncated_or_missing_shard_is_named(tmp_path: Path) -> None:
    run = _copy("sharded", tmp_path)
    shard = run / "ckpt-1.data-00002-of-00004"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match=r"ckpt-1\.data-00002-of-00004"):
        cloudckpt.load_variable(run / "ckpt-1", "w3")
    shard.unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"ckpt-1\.data-00002-of-00004"):
        cloudckpt.load_variable(run / "ckpt-1", "w3")
    assert cloudckpt.load_variable(run / "ckpt-1", "w0").shape == (16, 16)  # other shards unaffected


# ---------------------------------------------------------------------------- hand-made bundles
def _write(writer: tfw.BundleWriter, tmp_path: Path, name: str = "ckpt") -> Path:
    writer.write(tmp_path, name)
    return tmp_path / name


def test_big_endian_bundles_are_byte_swapped(tmp_path: Path) -> None:
    writer = tfw.BundleWriter(big_endian=True)
    values = {
        "f": (1, np.array([[1.5, -2.25], [3.0, np.inf]], np.float32)),
        "c": (8, np.array([1 + 2j, -0.5j], np.complex64)),
        "i": (5, np.array([-2, 300], np.int16)),
        "b": (10, np.array([True, False])),
    }
    for key, (dtype, array) in values.items():
        writer.add_array(key, dtype, array)
    bf16 = np.array([1.0, -3.5], ml_dtypes.bfloat16)
    writer.add_array("h", 14, bf16.view(np.uint16))  # bfloat16 bits, swapped as 2-byte words
    writer.add_strings("s", [b"big", b"", b"endian"], [3])
    path = _write(writer, tmp_path)
    for key, (_, array) in values.items():
        assert_same(cloudckpt.load_variable(path, key), array, key)
    assert_same(cloudckpt.load_variable(path, "h"), bf16, "bfloat16")
    assert cloudckpt.load_variable(path, "s").tolist() == [b"big", b"", b"endian"]


def test_huge_claimed_sizes_are_refused_before_allocating(tmp_path: Path) -> None:
    writer = tfw.BundleWriter()
    writer.add_array("small", 1, np.zeros(4, np.float32))
    writer.add_raw(b"huge", tfw.entry(1, [1 << 40], size=4 << 40))  # 4 TiB of float32
    writer.add_raw(b"strings", tfw.entry(7, [1 << 40], size=1 << 45))
    path = _write(writer, tmp_path)
    for key in ("huge", "strings"):
        with pytest.raises(CheckpointFormatError, match=f"'{key}'.*has 16 bytes"):
            cloudckpt.load_variable(path, key)
    assert cloudckpt.load_variable(path, "small").tolist() == [0.0] * 4


def test_offsets_past_the_shard_and_bad_shard_ids(tmp_path: Path) -> None:
    writer = tfw.BundleWriter()
    writer.add_array("a", 3, np.arange(4, dtype=np.int32))
    writer.add_raw(b"past", tfw.entry(3, [4], offset=10, size=16))
    path = _write(writer, tmp_path)
    with pytest.raises(CheckpointFormatError, match=r"'past'.*\[10, 26\)"):
        cloudckpt.load_variable(path, "past")
    writer.add_raw(b"shard", tfw.entry(3, [4], shard=3, size=16))
    path = _write(writer, tmp_path / "two")
    with pytest.raises(CheckpointFormatError, match="shard 3 of a 1-shard"):
        cloudckpt.list_variables(path)


@pytest.mark.parametrize("value, problem", [
    (b"\x08" + b"\xff" * 11, "varint longer"),          # dtype varint never ends
    (b"\x08\x01\x12\x03\x12\x01\x08", "truncated varint"),  # shape dim cut short
    (b"\x08\x01\x12\x7f", "claims 127 bytes"),            # length past the message
    (b"\x0b\x01", "wire type 3"),                         # a group
    (b"\x08\x01\x12\x04\x12\x02\x08\x7f\x28\x01", "bytes stored"),  # size 1 for 127 float32
    (b"\x08\x01\x12\x0d\x12\x0b\x08" + b"\xff" * 9 + b"\x01", "dimension 0 has size -1"),
])
def test_malformed_entries_are_format_errors(tmp_path: Path, value: bytes, problem: str) -> None:
    writer = tfw.BundleWriter()
    writer.add_raw(b"bad", value)
    with pytest.raises(CheckpointFormatError, match=problem):
        cloudckpt.list_variables(_write(writer, tmp_path))


def test_broken_tables_are_format_errors(tmp_path: Path) -> None:
    writer = tfw.BundleWriter()
    writer.add_array("a", 1, np.ones(3, np.float32))
    index = bytearray(writer.index())
    cases = {}
    flipped = bytearray(index)
    flipped[3] ^= 1
    cases["CRC32C"] = bytes(flipped)
    footer = bytearray(index)
    footer[-48:-8] = (tfw.varint(0) + tfw.varint(0) + tfw.varint(10**6) + tfw.varint(5)).ljust(40, b"\0")
    cases["past the end"] = bytes(footer)
    cases["neither cloudckpt's"] = bytes(index[:-1]) + b"\0"
    snappy = tfw.table([(b"", tfw.header())])
    blocks = tfw.block([(b"", tfw.header())])
    cases["snappy"] = tfw.with_trailer(blocks, kind=1) + snappy[len(blocks) + 5:]
    disorder = tfw.table([(b"", tfw.header()), (b"b", tfw.entry(1, [0])), (b"a", tfw.entry(1, [0]))])
    cases["out of order"] = disorder
    restarts = bytearray(tfw.block([(b"", tfw.header())]))
    restarts[-4:] = struct.pack("<I", 10**6)
    cases["restart points"] = _table_with_block(bytes(restarts))
    for problem, data in cases.items():
        (tmp_path / "ckpt.index").write_bytes(data)
        (tmp_path / "ckpt.data-00000-of-00001").write_bytes(b"\0" * 12)
        with pytest.raises(CheckpointFormatError, match=problem):
            cloudckpt.list_variables(tmp_path / "ckpt")


def _table_with_block(contents: bytes) -> bytes:
    """A table whose only data block is ``contents`` as given (with a correct trailer)."""
    out = tfw.with_trailer(contents)
    meta = tfw.block([])
    meta_handle = tfw.varint(len(out)) + tfw.varint(len(meta))
    out += tfw.with_trailer(meta)
    index = tfw.block([(b"\xff", tfw.varint(0) + tfw.varint(len(contents)))], restart_interval=1)
    index_handle = tfw.varint(len(out)) + tfw.varint(len(index))
    out += tfw.with_trailer(index)
    return out + (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", tfw.MAGIC)


def test_index_block_keys_that_spell_too_much_are_refused(tmp_path: Path) -> None:
    """3,000 empty data blocks whose separators each extend the one before (TensorFlow stores every one whole)."""
    out = bytearray(tfw.with_trailer(tfw.block([(b"", tfw.header())])))
    handles = [(b"", tfw.varint(0) + tfw.varint(len(out) - 5))]
    for n in range(1, 3001):
        empty = tfw.block([])
        handles.append((b"\xff" * (8 * n), tfw.varint(len(out)) + tfw.varint(len(empty))))
        out += tfw.with_trailer(empty)
    meta = tfw.block([])
    meta_handle = tfw.varint(len(out)) + tfw.varint(len(meta))
    out += tfw.with_trailer(meta)
    index = tfw.block(handles, restart_interval=len(handles))
    index_handle = tfw.varint(len(out)) + tfw.varint(len(index))
    out += tfw.with_trailer(index)
    (tmp_path / "ckpt.index").write_bytes(bytes(out) + (meta_handle + index_handle).ljust(40, b"\0")
                                          + struct.pack("<Q", tfw.MAGIC))
    with pytest.raises(CheckpointFormatError, match="index block, key of"):
        cloudckpt.list_variables(tmp_path / "ckpt")


def test_resource_variant_and_unknown_dtypes_are_refused_by_name(tmp_path: Path) -> None:
    writer = tfw.BundleWriter()
    writer.add_array("ok", 9, np.array([5], np.int64))
    writer.add_raw(b"handle", tfw.entry(20, [], size=8))
    writer.add_raw(b"iterator", tfw.entry(21, [], size=8))
    writer.add_raw(b"future", tfw.entry(99, [1], size=8))
    writer.shards[0] += b"\0" * 8
    path = _write(writer, tmp_path)
    dtypes = {t.name: t.dtype for t in bundle_at(path).tensors()}
    assert dtypes == {"ok": "int64", "handle": "resource", "iterator": "variant", "future": "DataType 99"}
    for key, what in (("handle", "resource"), ("iterator", "variant"), ("future", "DataType 99")):
        with pytest.raises(CheckpointFormatError, match=f"'{key}'.*{what}"):
            cloudckpt.load_variable(path, key)
    assert cloudckpt.load_variable(path, "ok").tolist() == [5]


def test_a_newer_bundle_version_is_refused(tmp_path: Path) -> None:
    items = [(b"", tfw.header(min_consumer=2))]
    (tmp_path / "ckpt.index").write_bytes(tfw.table(items))
    with pytest.raises(CheckpointFormatError, match="version >= 2"):
        cloudckpt.list_variables(tmp_path / "ckpt")


@pytest.mark.parametrize("slices, problem", [
    ([[(0, 2), (0, None)]], "do not cover"),                    # rows 2-3 missing
    ([[(0, 3), (0, None)], [(2, 2), (0, None)]], "overlap"),     # row 2 twice, same total as a gap
    ([[(0, 5), (0, None)]], "outside dimension 0"),
])
def test_slices_must_tile_the_tensor(tmp_path: Path, slices: list[list[tuple[int, int | None]]],
                                     problem: str) -> None:
    from cloudckpt.tfbundle.entries import Extent, slice_key

    writer = tfw.BundleWriter()
    writer.add_raw(b"p", tfw.entry(1, [4, 2], slices=slices))
    for extents in slices:
        shape = [n if n is not None else 2 for _, n in extents]
        key = slice_key("p", tuple(Extent(s, n) for s, n in extents)).encode("utf-8", "surrogateescape")
        data = np.ones(shape, np.float32).tobytes()
        writer.add_raw(key, tfw.entry(1, shape, offset=len(writer.shards[0]), size=len(data), crc=tfw.crc32c(data)))
        writer.shards[0] += data
    if problem == "overlap":
        writer.add_raw(b"p", tfw.entry(1, [5, 2], slices=slices))
    with pytest.raises(CheckpointFormatError, match=problem):
        cloudckpt.load_variable(_write(writer, tmp_path), "p")


def _partitioned(writer: tfw.BundleWriter, key: str, shape: Sequence[int],
                 slices: Sequence[Sequence[tuple[int, int | None]]], *, alias: bool = False) -> np.ndarray:
    """A float64 tensor ``key`` stored as ``slices`` (each its own entry and bytes; ``alias``: all at offset 0).

    Returns the full tensor its slices hold (``np.arange`` values; zeros when aliased).
    """
    from cloudckpt.tfbundle.entries import Extent, slice_key

    full = np.zeros(shape) if alias else np.arange(float(np.prod(shape))).reshape(shape)
    writer.add_raw(key.encode(), tfw.entry(2, shape, slices=slices))
    start = len(writer.shards[0])
    for extents in slices:
        box = tuple(slice(a, a + (n if n is not None else dim)) for (a, n), dim in zip(extents, shape, strict=True))
        data = np.ascontiguousarray(full[box]).tobytes()
        offset = start if alias else len(writer.shards[0])
        raw_key = slice_key(key, tuple(Extent(a, n) for a, n in extents)).encode("utf-8", "surrogateescape")
        writer.add_raw(raw_key, tfw.entry(2, full[box].shape, offset=offset, size=len(data), crc=tfw.crc32c(data)))
        if not alias or len(writer.shards[0]) == start:
            writer.shards[0] += data
    return full


def test_verify_refuses_slices_that_overlap_and_leave_a_hole(tmp_path: Path) -> None:
    """Each slice matches its CRC32C and the volumes add up, but row 2 is stored twice and row 4 never."""
    from cloudckpt.cli.verify import verify_checkpoint

    writer = tfw.BundleWriter()
    writer.add_array("ok", 3, np.arange(3, dtype=np.int32))
    _partitioned(writer, "p", [5, 2], [[(0, 3), (0, None)], [(2, 2), (0, None)]])
    path = _write(writer, tmp_path)
    report = verify_checkpoint(LocalStorage(str(tmp_path)), path.name, show_progress=False)
    assert not report.intact
    assert any("'p'" in p.detail and "overlap" in p.detail for p in report.problems), report.problems
    with pytest.raises(CheckpointFormatError, match=r"'p'.*overlap"):
        cloudckpt.load_variable(path, "p")


def test_slices_sharing_bytes_are_refused(tmp_path: Path) -> None:
    """Disjoint in the tensor, one row of bytes in the shard: 64 rows read from 1 (the array would outgrow the data)."""
    writer = tfw.BundleWriter()
    _partitioned(writer, "p", [64, 4], [[(row, 1), (0, None)] for row in range(64)], alias=True)
    with pytest.raises(CheckpointFormatError, match=r"'p'.*share bytes"):
        cloudckpt.load_variable(_write(writer, tmp_path), "p")


# ---------------------------------------------------------------------------- memory linear in the input
#: Peak traced memory a read may take per byte of input (index + shards), and a fixed allowance.
MEMORY_PER_INPUT_BYTE = 64
MEMORY_FIXED = 1 << 20


def _peak(read: Any) -> tuple[int, Any]:
    """``(peak bytes traced while read() ran, its result or the CheckpointFormatError it raised)``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result = read()
        except CheckpointFormatError as exc:
            result = exc
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _input_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + ".*"))


def _assert_bounded(path: Path, peak: int) -> None:
    bound = MEMORY_PER_INPUT_BYTE * _input_size(path) + MEMORY_FIXED
    assert peak <= bound, f"peak {peak} bytes for {_input_size(path)} bytes of input (bound {bound})"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 512), width=st.integers(1, 1 << 15), damage=st.sampled_from(["none", "alias", "overlap"]))
@example(rows=512, width=1 << 15, damage="alias")
@example(rows=512, width=1 << 10, damage="overlap")
@example(rows=512, width=512, damage="none")
def test_partitioned_tensors_cost_memory_linear_in_the_input(tmp_path: Path, rows: int, width: int,
                                                             damage: str) -> None:
    """Row slices of a [rows, width] float64 tensor, intact, aliasing one row of bytes, or overlapping (with a hole).

    The slices' claimed volume grows with rows x width whatever the bytes stored: the reader
    may allocate in proportion to the bytes (index and shards), never to the claimed shape.
    """
    if damage == "none":
        width = max(1, min(width, (1 << 18) // rows))  # real bytes: at most 2 MiB
    slices = [[(row, 1), (0, None)] for row in range(rows)]
    if damage == "overlap" and rows > 1:
        slices[-1] = [(0, 1), (0, None)]  # row 0 twice, the last row never
    writer = tfw.BundleWriter()
    full = _partitioned(writer, "p", [rows, width], slices, alias=damage == "alias")
    run = tmp_path / f"p-{rows}-{width}-{damage}"
    path = _write(writer, run)
    _peak(lambda: cloudckpt.list_variables(path))  # imports and caches: not the read's cost
    peak, result = _peak(lambda: cloudckpt.load_variable(path, "p"))
    _assert_bounded(path, peak)
    if damage == "none" or rows == 1:
        assert isinstance(result, np.ndarray) and result.tobytes() == full.tobytes(), result
    else:
        assert isinstance(result, CheckpointFormatError), result
    shutil.rmtree(run)


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[list[int], list[tuple[list[int], list[int]]], bool]:
    """``(shape, boxes, damaged)``: a random guillotine partition of a large shape, perhaps with one box moved."""
    ndim = draw(st.integers(1, 8))
    shape = [draw(st.integers(2, 1 << (50 // ndim))) for _ in range(ndim)]  # up to 2^50 elements
    boxes = [([0] * ndim, list(shape))]
    for _ in range(draw(st.integers(1, 200))):
        start, extent = boxes.pop(draw(st.integers(0, len(boxes) - 1)))
        splittable = [d for d in range(ndim) if extent[d] > 1]
        if not splittable:
            boxes.append((start, extent))
            continue
        d = draw(st.sampled_from(splittable))
        cut = draw(st.integers(1, extent[d] - 1))
        boxes.append((start, [*extent[:d], cut, *extent[d + 1:]]))
        boxes.append(([*start[:d], start[d] + cut, *start[d + 1:]], [*extent[:d], extent[d] - cut, *extent[d + 1:]]))
    damaged = len(boxes) > 1 and draw(st.booleans())
    if damaged:  # one box one step along a dimension it does not span whole: an overlap and a hole
        i = draw(st.integers(0, len(boxes) - 1))
        start, extent = boxes[i]
        d = next((d for d in range(ndim) if extent[d] < shape[d]), None)
        if d is None:
            damaged = False
        else:
            start = list(start)
            start[d] += 1 if start[d] + extent[d] < shape[d] else -1
            boxes[i] = (start, extent)
    return shape, boxes, damaged


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=_layouts())
def test_proving_slices_tile_a_tensor_costs_memory_linear_in_the_index(tmp_path: Path,
                                                                       layout: tuple[list[int], Any, bool]) -> None:
    """Up to 200 slices in up to 8 dimensions of up to 2^50 elements: opening proves the tiling (or refuses
    the layout) in memory that grows with the index, never with the shape."""
    from cloudckpt.tfbundle.entries import Extent, slice_key

    shape, boxes, damaged = layout
    writer = tfw.BundleWriter()
    slices = [list(zip(start, extent, strict=True)) for start, extent in boxes]
    writer.add_raw(b"p", tfw.entry(2, shape, slices=slices))
    offset = 0
    for start, extent in boxes:  # bytes the shard does not hold: opening never reads them
        key = slice_key("p", tuple(Extent(a, n) for a, n in zip(start, extent, strict=True)))
        size = 8 * int(np.prod(extent, dtype=object))
        writer.add_raw(key.encode("utf-8", "surrogateescape"), tfw.entry(2, extent, offset=offset, size=size))
        offset += size
    path = _write(writer, tmp_path)
    _peak(lambda: cloudckpt.list_variables(path))  # imports and caches: not the read's cost
    peak, result = _peak(lambda: cloudckpt.list_variables(path))
    _assert_bounded(path, peak)
    if damaged:
        assert isinstance(result, CheckpointFormatError) and "'p'" in str(result), result
    elif len(shape) <= 4:  # corner counting fits the budget for any layout of up to 4 dimensions
        assert result == [("p", shape)], result
    else:
        assert result == [("p", shape)] or "too irregular" in str(result), result


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(1, 3000), growth=st.integers(1, 8), restart=st.sampled_from([1, 16, None]))
@example(count=3000, growth=8, restart=None)
@example(count=3000, growth=8, restart=16)
def test_an_index_costs_memory_linear_in_its_size(tmp_path: Path, count: int, growth: int,
                                                  restart: int | None) -> None:
    """Keys that each extend the one before: stored with a restart point every ``restart`` keys (TensorFlow: 16).

    With one restart point for the whole block, n stored bytes spell keys of n^2/2 bytes in
    all; the table reader must refuse that, and read every table TensorFlow writes.
    """
    stem = bytes(range(97, 97 + 26)) * (count * growth // 26 + 1)
    items = [(b"", tfw.header())] + [(stem[:(n + 1) * growth], tfw.entry(1, [0])) for n in range(count)]
    run = tmp_path / f"keys-{count}-{growth}-{restart}"
    run.mkdir()
    (run / "ckpt.index").write_bytes(tfw.table(items, per_block=len(items), restart_interval=restart or len(items)))
    (run / "ckpt.data-00000-of-00001").write_bytes(b"")
    path = run / "ckpt"
    _peak(lambda: cloudckpt.list_variables(path))  # imports and caches: not the read's cost
    peak, result = _peak(lambda: cloudckpt.list_variables(path))
    _assert_bounded(path, peak)
    if restart is not None:
        assert isinstance(result, list) and len(result) == count, result
    else:
        assert isinstance(result, list) or "key" in str(result), result
    shutil.rmtree(run)


def test_lying_string_lengths_are_checksum_errors(tmp_path: Path) -> None:
    writer = tfw.BundleWriter()
    data, crc = tfw.string_tensor([b"abc", b"de"])
    lying = tfw.varint(200) + data[1:]  # first length 3 -> 200, more than the entry holds
    writer.add_raw(b"s", tfw.entry(7, [2], size=len(lying), crc=crc))
    writer.shards[0] += lying
    with pytest.raises(ChecksumError, match="'s'"):
        cloudckpt.load_variable(_write(writer, tmp_path), "s")


def _graph(nodes: list[bytes]) -> bytes:
    return b"".join(tfw.field_bytes(1, node) for node in nodes)


def _child(node_id: int, name: str) -> bytes:
    return tfw.field_bytes(1, tfw.field_varint(1, node_id) + tfw.field_bytes(2, name.encode()))


def _attribute(key: str) -> bytes:
    return tfw.field_bytes(2, tfw.field_bytes(1, b"VARIABLE_VALUE") + tfw.field_bytes(3, key.encode()))


def test_deep_and_cyclic_object_graphs_cost_no_recursion(tmp_path: Path) -> None:
    depth = 50_000
    nodes = [_child(i + 1, "n") + _child(0, "back") for i in range(depth)]  # a chain with a cycle back to root
    nodes.append(_attribute("deep/.ATTRIBUTES/VARIABLE_VALUE"))
    writer = tfw.BundleWriter()
    writer.add_strings("_CHECKPOINTABLE_OBJECT_GRAPH", [_graph(nodes)], [])
    writer.add_array("deep/.ATTRIBUTES/VARIABLE_VALUE", 3, np.array([7], np.int32))
    path = _write(writer, tmp_path)
    (name, _), = cloudckpt.list_variables(path)
    assert name == "/".join(["n"] * depth)
    assert cloudckpt.load_variable(path, name).tolist() == [7]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 20_000), every=st.integers(1, 64), slots=st.integers(0, 64))
@example(depth=20_000, every=20_000, slots=0)
@example(depth=4_000, every=1, slots=0)
@example(depth=100, every=1, slots=64)
def test_naming_tensors_costs_memory_linear_in_the_object_graph(tmp_path: Path, depth: int, every: int,
                                                                slots: int) -> None:
    """A chain of ``depth`` objects with a tensor on every ``every``-th, and optimizer slots of slots.

    A node's path is as long as its depth, so a deep chain spells paths quadratic in the
    graph's size: only the tensors' names may be built, and only while they stay
    proportional to the input; past that the checkpoint is refused, never named at any cost.
    """
    named = [i for i in range(1, depth + 1) if i % every == 0 or i == depth]
    nodes = [_child(i + 1, "n") for i in range(depth)] + [b""]
    optimizer = len(nodes)
    nodes[0] += _child(optimizer, "opt")
    nodes.append(b"")
    writer = tfw.BundleWriter()
    for i in named:
        key = f"t{i}/.ATTRIBUTES/VARIABLE_VALUE"
        nodes[i] += _attribute(key)
        writer.add_array(key, 3, np.array([i], np.int32))
    previous = named[-1]
    for s in range(slots):  # each slot variable the slot of the one before: paths that nest
        slot = len(nodes)
        key = f"s{s}/.ATTRIBUTES/VARIABLE_VALUE"
        nodes.append(_attribute(key))
        nodes[optimizer] += tfw.field_bytes(3, tfw.field_varint(1, previous) + tfw.field_bytes(2, b"m")
                                            + tfw.field_varint(3, slot))
        writer.add_array(key, 3, np.array([s], np.int32))
        previous = slot
    writer.add_strings("_CHECKPOINTABLE_OBJECT_GRAPH", [_graph(nodes)], [])
    path = _write(writer, tmp_path)
    _peak(lambda: cloudckpt.list_variables(path))  # imports and caches: not the read's cost
    peak, result = _peak(lambda: cloudckpt.list_variables(path))
    _assert_bounded(path, peak)
    if isinstance(result, CheckpointFormatError):
        assert "object graph" in str(result), result
    else:
        names = [name for name, _ in result]
        assert "/".join(["n"] * depth) in names and len(names) == len(named) + slots, names[:3]


def test_an_object_graph_naming_missing_nodes_is_a_format_error(tmp_path: Path) -> None:
    writer = tfw.BundleWriter()
    writer.add_strings("_CHECKPOINTABLE_OBJECT_GRAPH", [_graph([_child(5, "x")])], [])
    writer.add_array("x/.ATTRIBUTES/VARIABLE_VALUE", 3, np.array([7], np.int32))
    with pytest.raises(CheckpointFormatError, match="node 5 of 1"):
        cloudckpt.list_variables(_write(writer, tmp_path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_an_index_ends_in_a_typed_error(tmp_path: Path, data: st.DataObject) -> None:
    """Truncations and byte flips of a real index: a CloudCkptError, or tensors that still verify."""
    original = (FIXTURES / "optimizer" / "ckpt-1.index").read_bytes()
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        damaged = damaged[:data.draw(st.integers(0, len(damaged)))]
    run = tmp_path / "fuzz"
    run.mkdir(exist_ok=True)
    shutil.copy(FIXTURES / "optimizer" / "ckpt-1.data-00000-of-00001", run)
    (run / "ckpt-1.index").write_bytes(bytes(damaged))
    try:
        reader = cloudckpt.load_checkpoint(run / "ckpt-1")
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except CloudCkptError:
        pass


def test_checkpoint_restore_of_a_tensorflow_checkpoint_says_what_it_is() -> None:
    from cloudckpt import Checkpoint
    from cloudckpt.errors import CheckpointFormatError

    with pytest.raises(CheckpointFormatError, match=r"is a TensorFlow bundle.*load_checkpoint"):
        Checkpoint(v=np.zeros(3)).restore(str(FIXTURES / "basic" / "ckpt-1"))
