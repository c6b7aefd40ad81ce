"""``ls`` and ``cp`` after incremental saves: shared data shown as what it is, bytes counted once,
and a one-checkpoint copy that fetches only the byte ranges it reads of an old object.

The scenario is the one that misled users: a model that changes every save plus a small
constant, saved by a manager with ``max_to_keep=2``. ckpt-1 is evicted, but its data object
stays - ckpt-3 and ckpt-4 still read the constant's 80 bytes from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import servers

from cloudckpt import load_checkpoint
from cloudckpt.cli.common import human_size
from cloudckpt.cli.copy import copy_checkpoint
from cloudckpt.format import (
    ArrayEntry,
    CheckpointIndex,
    Chunk,
    DataObject,
    Entry,
    NodeEntry,
    data_key,
    encode_index,
    index_key,
    object_checkpoint,
)
from cloudckpt.format.chunks import ChunkGrid, as_grid
from cloudckpt.format.index_fetch import load_index
from cloudckpt.storage import Storage, open_storage
from cloudckpt.storage.checksum import crc32c_of
from cloudckpt.tools.ranges import Packing, packed_name

REPO = Path(__file__).resolve().parent.parent
BIG = 250_000  # float32: a 1 MB data object per save


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudckpt", *args], capture_output=True, text=True,
                          env=dict(os.environ), cwd=REPO, timeout=300)


def write_checkpoint(storage: Storage, name: str, arrays: dict[str, tuple[np.ndarray, int, int]],
                     objects: tuple[DataObject, ...]) -> None:
    """An index naming ``arrays`` (key -> (array, object number, offset)) in ``objects``."""
    entries: dict[str, Entry] = {"": NodeEntry("object", ("model",)), "model": NodeEntry("dict", tuple(arrays))}
    for key, (array, obj, offset) in arrays.items():
        chunk = Chunk(obj, offset, array.nbytes, crc32c_of([array.tobytes()]), (0,) * array.ndim, array.shape)
        entries[f"model/{key}"] = ArrayEntry(str(array.dtype), array.shape, "ndarray", (chunk,))
    storage.put(index_key(name), encode_index(CheckpointIndex(name, entries, objects)))


def incremental_run(directory: str) -> dict[str, dict[str, np.ndarray]]:
    """What four incremental saves with ``max_to_keep=2`` leave: ckpt-3 and ckpt-4, each with its own
    object for the model that changed, both reading the constant from evicted ckpt-1's object.

    Written by hand, so the scenario does not depend on when a save decides to rewrite stale objects.
    """
    storage = open_storage(directory)
    rng = np.random.default_rng(0)
    const = np.arange(20, dtype=np.float32)
    first = rng.standard_normal(BIG).astype(np.float32)
    old = DataObject("ckpt-1.data-00000-of-00001.1111111111111111", first.nbytes + const.nbytes)
    storage.put(old.name, [first.tobytes(), const.tobytes()])
    saved = {}
    for n in (3, 4):
        big = rng.standard_normal(BIG).astype(np.float32)
        own = DataObject(f"ckpt-{n}.data-00000-of-00001.{n}{n}{n}{n}{n}{n}{n}{n}{n}{n}{n}{n}{n}{n}{n}{n}", big.nbytes)
        storage.put(own.name, big.tobytes())
        write_checkpoint(storage, f"ckpt-{n}", {"big": (big, 0, 0), "const": (const, 1, first.nbytes)}, (own, old))
        saved[f"ckpt-{n}"] = {"big": big, "const": const}
    return saved


def assert_restores(path: str, expected: dict[str, np.ndarray]) -> None:
    reader = load_checkpoint(path)
    for key, value in expected.items():
        assert np.array_equal(reader.get_tensor(f"model/{key}"), value), key


def stored(directory: Path) -> int:
    """Bytes of every index and data object (the state file aside)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name != "checkpoint")


def data_files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.rglob("*.data-*")}


# ---------------------------------------------------------------------------- ls
def test_ls_shows_an_evicted_checkpoints_kept_data_and_counts_bytes_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    incremental_run(str(run))
    open_storage(str(run)).put("ckpt-9.data-00000-of-00001.0123456789abcdef", b"a crashed save")
    assert not (run / "ckpt-1.index").exists() and any(n.startswith("ckpt-1.") for n in data_files(run))

    listing = cli("ls", str(run), "--json")
    assert listing.returncode == 0, listing.stderr
    doc = json.loads(listing.stdout)
    rows = {row["name"]: row for row in doc["checkpoints"]}
    assert {n: r["status"] for n, r in rows.items()} == {
        "ckpt-1": "evicted", "ckpt-3": "committed", "ckpt-4": "committed", "ckpt-9": "incomplete"}
    assert rows["ckpt-1"]["kept_for"] == ["ckpt-3", "ckpt-4"]
    assert rows["ckpt-1"]["kept_bytes"] == 80  # the constant: all the evicted object still serves
    assert rows["ckpt-9"]["kept_for"] == [] and rows["ckpt-9"]["size"] == len(b"a crashed save")
    assert rows["ckpt-4"]["shared_bytes"] == {"ckpt-1": 80}
    total = stored(run)
    assert doc["stored_bytes"] == total and sum(r["size"] for r in rows.values()) == total

    text = cli("ls", str(run))
    assert text.returncode == 0, text.stderr
    line = next(line for line in text.stdout.splitlines() if " ckpt-1 " in line)
    assert "evicted" in line and "kept for ckpt-3, ckpt-4" in line and "incomplete" not in line
    assert "incomplete" in next(line for line in text.stdout.splitlines() if " ckpt-9 " in line)
    assert f"{human_size(total)} stored in" in text.stdout


# ---------------------------------------------------------------------------- cp of a directory
def test_cp_of_a_directory_says_the_evicted_checkpoints_data_was_copied(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    saved = incremental_run(str(src))
    open_storage(str(src)).put("ckpt-9.data-00000-of-00001.0123456789abcdef", b"a crashed save")

    result = cli("cp", str(src), str(dst))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not copied (no index, and no copied checkpoint reads their data): ckpt-9" in result.stdout
    assert not any("not copied" in line and "ckpt-1" in line for line in result.stdout.splitlines()), result.stdout
    assert "ckpt-1 (evicted; data kept for ckpt-3, ckpt-4): copied with them" in result.stdout
    for name in ("ckpt-3", "ckpt-4"):
        assert_restores(f"{dst}/{name}", saved[name])
    listed = {r["name"]: r for r in json.loads(cli("ls", str(dst), "--json").stdout)["checkpoints"]}
    assert listed["ckpt-1"]["status"] == "evicted" and listed["ckpt-1"]["kept_for"] == ["ckpt-3", "ckpt-4"]


# ---------------------------------------------------------------------------- cp of one checkpoint
class ReadCounter:
    """Bytes a storage object fetched, through either read path (``get``; ``read_into``, which ``get_ranges`` uses)."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        get, read_into = storage.get, storage.read_into

        def counted_get(key: str, byte_range: Any = None) -> bytes:
            data = get(key, byte_range)
            self.bytes += len(data)
            return data

        def counted_read_into(requests: Any) -> None:
            read_into(requests)
            self.bytes += sum(memoryview(r.out).nbytes for r in requests)

        monkeypatch.setattr(storage, "get", counted_get)
        monkeypatch.setattr(storage, "read_into", counted_read_into)


@pytest.mark.parametrize("dst_name", ["ckpt-4", "renamed"])
def test_cp_of_one_checkpoint_copies_only_the_ranges_it_reads_of_an_old_object(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dst_name: str) -> None:
    run, dst = tmp_path / "run", tmp_path / "dst"
    saved = incremental_run(str(run))
    src = open_storage(str(run))
    reads = ReadCounter(src, monkeypatch)

    copy_checkpoint(src, "ckpt-4", open_storage(str(dst)), dst_name, force=False, reread=True, quiet=True)

    own = 4 * BIG  # ckpt-4's own object holds the changed model
    assert reads.bytes < own + 4096, reads.bytes  # not ckpt-1's whole 1 MB object for its 80 bytes
    index = load_index(open_storage(str(dst)), dst_name)
    assert index.references == () and {object_checkpoint(o.name) for o in index.objects} == {dst_name}
    assert sum(data_files(dst).values()) < own + 4096, data_files(dst)
    assert_restores(f"{dst}/{dst_name}", saved["ckpt-4"])
    verified = cli("verify", f"{dst}/{dst_name}")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_ranged_copy_moves_a_grid_arrays_offsets(tmp_path: Path) -> None:
    """An array stored as a ``ChunkGrid`` (64 chunks) in an old object: the copy's grid points at the new one."""
    run, dst = tmp_path / "run", tmp_path / "dst"
    storage = open_storage(str(run))
    rng = np.random.default_rng(1)
    grid_array = rng.standard_normal((64, 4)).astype(np.float32)
    filler = rng.integers(0, 255, 1 << 20, dtype=np.uint8)
    mine = rng.standard_normal(100).astype(np.float32)
    old = "ckpt-1.data-00000-of-00001.aaaaaaaaaaaaaaaa"
    new = "ckpt-2.data-00000-of-00001.bbbbbbbbbbbbbbbb"
    old_bytes = filler.tobytes() + grid_array.tobytes()
    storage.put(old, old_bytes)
    storage.put(new, mine.tobytes())

    def grid(object_number: int) -> ChunkGrid:
        rows = [Chunk(object_number, filler.nbytes + 16 * i, 16, crc32c_of([grid_array[i].tobytes()]), (i, 0), (1, 4))
                for i in range(64)]
        made = as_grid((64, 4), 4, rows)
        assert made is not None
        return made

    def whole(data: np.ndarray, object_number: int) -> ArrayEntry:
        chunk = Chunk(object_number, 0, data.nbytes, crc32c_of([data.tobytes()]), (0,), data.shape)
        return ArrayEntry(str(data.dtype), data.shape, "ndarray", (chunk,))

    first = CheckpointIndex("ckpt-1", {"": NodeEntry("object", ("filler", "g")), "filler": whole(filler, 0),
                                       "g": ArrayEntry("float32", (64, 4), "ndarray", grid(0))},
                            (DataObject(old, len(old_bytes)),))
    second = CheckpointIndex("ckpt-2", {"": NodeEntry("object", ("g", "mine")), "mine": whole(mine, 0),
                                        "g": ArrayEntry("float32", (64, 4), "ndarray", grid(1))},
                             (DataObject(new, mine.nbytes), DataObject(old, len(old_bytes))), references=("ckpt-1",))
    storage.put(index_key("ckpt-1"), encode_index(first))
    storage.put(index_key("ckpt-2"), encode_index(second))
    assert cli("verify", str(run)).returncode == 0

    result = cli("cp", f"{run}/ckpt-2", f"{dst}/")
    assert result.returncode == 0, result.stdout + result.stderr
    copied = load_index(open_storage(str(dst)), "ckpt-2")
    entry = copied.entries["g"]
    assert isinstance(entry, ArrayEntry) and isinstance(entry.chunks, ChunkGrid)
    assert copied.references == () and sum(data_files(dst).values()) == mine.nbytes + grid_array.nbytes
    assert cli("verify", f"{dst}/ckpt-2").returncode == 0
    reader = load_checkpoint(f"{dst}/ckpt-2")
    assert np.array_equal(reader.get_tensor("g"), grid_array) and np.array_equal(reader.get_tensor("mine"), mine)


def test_a_packing_maps_every_byte_range_to_its_source_bytes() -> None:
    """Whatever parts a writer asks for, the source ranges give exactly the packed bytes."""
    rng = np.random.default_rng(2)
    source = rng.integers(0, 255, 10_000, dtype=np.uint8).tobytes()
    for _ in range(200):
        cuts = sorted(rng.choice(10_000, size=8, replace=False).tolist())
        spans = [(cuts[i], cuts[i + 1]) for i in range(0, 8, 2)] + [(cuts[0], cuts[1])]  # a repeat merges
        packing = Packing.of("ckpt-1.data-00000-of-00001.aaaaaaaaaaaaaaaa", "x", spans)
        packed = b"".join(source[s:e] for s, e in packing.spans)
        assert packing.size == len(packed)
        start, end = sorted(rng.integers(0, packing.size + 1, size=2).tolist())
        assert b"".join(source[s:e] for s, e in packing.source_ranges(start, end)) == packed[start:end]
        for s, e in packing.spans:
            assert packed[packing.moved(s):packing.moved(s) + e - s] == source[s:e]


def test_a_ranged_copy_on_s3_streams_several_ranges_in_multipart_parts(
        seaweedfs: servers.Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 3 MiB ranges of a 14 MiB object go up as a 6 MiB object in 5 MiB parts: a part
    boundary falls inside the second range."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    run = f"s3://{s3_bucket}/ranged-{uuid.uuid4().hex[:8]}"
    storage = open_storage(run)
    rng = np.random.default_rng(3)
    mib = 1 << 20
    parts = [rng.standard_normal(n * mib // 4).astype(np.float32) for n in (3, 4, 3, 4)]
    mine = rng.standard_normal(1000).astype(np.float32)
    old = DataObject("ckpt-1.data-00000-of-00001.1111111111111111", 14 * mib)
    new = DataObject("ckpt-2.data-00000-of-00001.2222222222222222", mine.nbytes)
    storage.put(old.name, [p.tobytes() for p in parts])
    storage.put(new.name, mine.tobytes())
    write_checkpoint(storage, "ckpt-2", {"a": (parts[0], 1, 0), "c": (parts[2], 1, 7 * mib), "mine": (mine, 0, 0)},
                     (new, old))

    copied = cli("cp", f"{run}/ckpt-2", f"{run}-copy/ckpt-2", "--part-size", "5MiB")
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert "1 of them only the ranges it reads of a larger object" in copied.stdout
    target = open_storage(f"{run}-copy")
    index = load_index(target, "ckpt-2")
    assert index.references == () and sorted(o.size for o in index.objects) == [mine.nbytes, 6 * mib]
    assert cli("verify", f"{run}-copy/ckpt-2").returncode == 0
    reader = load_checkpoint(f"{run}-copy/ckpt-2")
    for key, value in (("a", parts[0]), ("c", parts[2]), ("mine", mine)):
        assert np.array_equal(reader.get_tensor(f"model/{key}"), value), key


def test_a_ranged_copy_of_damaged_source_bytes_names_them_and_commits_nothing(tmp_path: Path) -> None:
    run, dst = tmp_path / "run", tmp_path / "dst"
    incremental_run(str(run))
    (old,) = (p for p in run.iterdir() if p.name.startswith("ckpt-1.data-"))
    content = bytearray(old.read_bytes())
    content[4 * BIG + 5] ^= 0x01  # inside the constant, the only range ckpt-4 reads of it
    old.write_bytes(bytes(content))

    result = cli("cp", f"{run}/ckpt-4", f"{dst}/")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"source bytes [{4 * BIG}, {4 * BIG + 80}) of {old}" in result.stderr and "CRC32C" in result.stderr
    assert not dst.exists() or not any(dst.iterdir())


def test_a_packed_objects_name_belongs_to_the_copy_and_keeps_a_spread_layout() -> None:
    flat = packed_name("ckpt-1.data-00003-of-00008.1111111111111111", "copy", "2222222222222222")
    spread = packed_name(data_key("ckpt-1", 3, 8, "1111111111111111", spread=True), "copy", "2222222222222222")
    assert flat == "copy.data-00003-of-00008.2222222222222222"
    assert spread == data_key("copy", 3, 8, "2222222222222222", spread=True) and "/" in spread
    assert object_checkpoint(flat) == object_checkpoint(spread) == "copy"
    with pytest.raises(ValueError, match="not a data object"):
        packed_name("ckpt-1.index", "copy", "2222222222222222")
