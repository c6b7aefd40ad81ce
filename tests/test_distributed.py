"""Multi-host checkpoints: mesh arithmetic, the save plan, sharded save/restore, and real gloo groups.

The in-process tests cover the shard arithmetic, the planner and single-process sharded
checkpoints (a 2x2 mesh held by one process). The multi-process tests spawn real
``torch.distributed`` gloo groups on 127.0.0.1 against SeaweedFS: one spawn of 4
processes runs every save scenario (see tests/distributed_worker.py), one spawn of 2
restores onto a smaller mesh, and this process restores onto a single one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import distributed_worker
import numpy as np
import pytest
import torch

import cloudckpt
from cloudckpt import UNSHARDED, Checkpoint, CheckpointOptions, DTensorCheckpoint, Layout, Mesh, ShardedArray, Variable
from cloudckpt.coordination import io_rank
from cloudckpt.distributed import CoordinationError, DistributedSaveError, LocalCoordinator
from cloudckpt.distributed.mesh import split_extent
from cloudckpt.errors import ChecksumError, PlanError
from cloudckpt.format import decode_index, index_key
from cloudckpt.format.state_file import STATE_KEY, parse
from cloudckpt.restoring.array_reads import partial_reads
from cloudckpt.saving.plan import Description, PieceDescription, make_plan
from cloudckpt.storage import register_storage, resolve
from cloudckpt.storage.local import LocalStorage
from cloudckpt.testing.processes import spawn_reports

SPAWN_TIMEOUT = 300.0


def local_mesh(shape: tuple[int, ...] = (2, 2), names: tuple[str, ...] = ("x", "y")) -> Mesh:
    return Mesh(names, shape, coordinator=LocalCoordinator())


def read_index(path: str) -> Any:
    location = resolve(path)
    return decode_index(location.storage.get(index_key(location.name)), location.name, path)


# ---------------------------------------------------------------------------- mesh and layout
def test_split_extent_follows_torch_chunk() -> None:
    for size in range(0, 12):
        for parts in range(1, 6):
            pieces = torch.arange(size).chunk(parts) if size else ()
            for i in range(parts):
                offset, length = split_extent(size, parts, i)
                expected = pieces[i].tolist() if i < len(pieces) else []
                assert list(range(offset, offset + length)) == expected, (size, parts, i)


def test_layout_boxes_on_a_2x2_mesh() -> None:
    mesh = local_mesh()
    layout = Layout(["x", UNSHARDED, "y"], mesh)
    boxes = [layout.box((5, 3, 4), d) for d in range(4)]
    assert boxes == [((0, 0, 0), (3, 3, 2)), ((0, 0, 2), (3, 3, 2)), ((3, 0, 0), (2, 3, 2)), ((3, 0, 2), (2, 3, 2))]
    assert Layout.replicated(mesh, 2).box((4, 4), 3) == ((0, 0), (4, 4))
    assert Layout.batch_sharded(mesh, "y", 2).box((4, 4), 1) == ((2, 0), (2, 4))
    assert mesh.local_devices() == (0, 1, 2, 3)


def test_mesh_and_layout_errors_name_the_argument() -> None:
    mesh = local_mesh()
    with pytest.raises(ValueError, match="'z' is not a dimension"):
        Layout(["z"], mesh)
    with pytest.raises(ValueError, match="mesh dimension 'x' splits two"):
        Layout(["x", "x"], mesh)
    with pytest.raises(ValueError, match="dim_names must be unique"):
        Mesh(["x", "x"], [1, 1], coordinator=LocalCoordinator())
    with pytest.raises(ValueError, match="device_processes"):
        Mesh(["x"], [2], coordinator=LocalCoordinator(), device_processes=[0, 1])
    with pytest.raises(ValueError, match="shard of device 1"):
        ShardedArray((4,), np.float32, Layout(["x"], local_mesh((2,), ("x",))),
                     [np.zeros(2, np.float32), np.zeros(3, np.float32)])


def test_io_device_names_a_rank() -> None:
    class Four(LocalCoordinator):
        def __init__(self) -> None:
            super().__init__()
            self.world_size = 4

    assert io_rank(CheckpointOptions(), Four()) is None
    assert io_rank(CheckpointOptions(experimental_io_device="/job:localhost"), Four()) is None
    assert io_rank(CheckpointOptions(experimental_io_device="/job:worker/replica:0/task:3"), Four()) == 3
    assert io_rank(CheckpointOptions(experimental_io_device="/job:worker/task:3"), LocalCoordinator()) is None
    with pytest.raises(ValueError, match="task 4 is not a rank"):
        io_rank(CheckpointOptions(experimental_io_device="/job:worker/task:4"), Four())


# ---------------------------------------------------------------------------- planner
def _desc(pieces: list[list[Any]], arrays: dict[str, list[Any]], suffix: str = "s", url: str = "") -> Description:
    return Description(url=url, suffix=suffix, max_objects=4,
                       arrays={path: (dtype, tuple(shape)) for path, (dtype, shape) in arrays.items()},
                       pieces=tuple(PieceDescription((path, tuple(start)), tuple(shape), nbytes)
                                    for path, start, shape, nbytes in pieces))


def test_plan_writes_each_replica_once_and_spreads_them() -> None:
    arrays = {f"r{i}": ["float32", [10]] for i in range(8)}
    pieces = [[f"r{i}", [0], [10], 40] for i in range(8)]
    plan = make_plan([_desc(pieces, arrays, f"s{r}") for r in range(4)], committer=0, io_rank=None)
    assert sorted(plan.writer) == sorted((f"r{i}", (0,)) for i in range(8))
    assert sorted(plan.writer.values()) == [0, 0, 1, 1, 2, 2, 3, 3]  # two replicas per host, not all on rank 0
    assert plan.suffix == "s0"
    assert plan.total_objects == sum(len(g) for g in plan.groups) == 4
    assert plan.offsets == (0, 1, 2, 3)

    io = make_plan([_desc(pieces, arrays, f"s{r}") for r in range(4)], committer=2, io_rank=2)
    assert set(io.writer.values()) == {2}  # the io host holds every replica: nothing travels
    assert io.suffix == "s2" and [len(g) for g in io.groups] == [0, 0, 1, 0]


def test_plan_refuses_inconsistent_hosts_naming_the_key() -> None:
    arrays = {"w": ["float32", [4]]}
    with pytest.raises(PlanError, match=r"'w'.*cover"):
        make_plan([_desc([["w", [0], [2], 8]], arrays), _desc([["w", [0], [2], 8]], arrays)],
                  committer=0, io_rank=None)
    with pytest.raises(PlanError, match=r"'w'.*cover"):
        make_plan([_desc([["w", [0], [3], 12]], arrays), _desc([["w", [2], [2], 8]], arrays)],
                  committer=0, io_rank=None)
    with pytest.raises(PlanError, match="disagree on array 'w'"):
        make_plan([_desc([["w", [0], [4], 16]], arrays), _desc([["w", [0], [4], 16]], {"w": ["int32", [4]]})],
                  committer=0, io_rank=None)
    other_path = _desc([["w", [2], [2], 8]], arrays, url="s3://b/run/ckpt-1")
    with pytest.raises(PlanError, match=r"different paths: rank 0 to '', rank 1 to 's3://b/run/ckpt-1'"):
        make_plan([_desc([["w", [0], [2], 8]], arrays), other_path], committer=0, io_rank=None)


# ---------------------------------------------------------------------------- partial reads
def test_partial_reads_cover_exactly_what_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudckpt.restoring.array_reads as reader

    chunk = np.arange(20 * 9).reshape(20, 9)
    for waste in (0, 64, 1 << 20):
        monkeypatch.setattr(reader, "MAX_READ_WASTE", waste)
        reads = partial_reads(chunk.shape, (3, 2), (11, 4), chunk.itemsize)
        got = np.zeros_like(chunk)
        fetched = 0
        for first, count, start, extent in reads:
            flat = chunk.reshape(-1)[first:first + count]
            fetched += count
            strides = (9 * chunk.itemsize, chunk.itemsize)
            view = np.lib.stride_tricks.as_strided(flat, shape=extent, strides=strides)
            got[start[0]:start[0] + extent[0], start[1]:start[1] + extent[1]] = view
        assert np.array_equal(got[3:14, 2:6], chunk[3:14, 2:6])
        assert got.sum() == chunk[3:14, 2:6].sum()
        if waste == 0:
            assert fetched == 11 * 4
        else:
            assert (fetched - 44) * chunk.itemsize <= max(waste, 0) + 9 * chunk.itemsize * len(reads)


# ---------------------------------------------------------------------------- one process, 2x2 mesh
def test_single_process_sharded_round_trips(tmp_path: Path) -> None:
    mesh = local_mesh()
    g = np.arange(48, dtype=np.float32).reshape(8, 6)
    r = np.linspace(0, 1, 5)
    w = ShardedArray.from_global(g, Layout(["x", "y"], mesh))
    rep = ShardedArray.from_global(r, Layout([UNSHARDED], mesh))
    path = DTensorCheckpoint(mesh, w=w, rep=rep, plain=np.ones(3), step=Variable(4)).save(tmp_path / "ck")
    index = read_index(path)
    assert len(index.entries["w"].chunks) == 4 and len(index.entries["rep"].chunks) == 1  # replicas once
    assert sum(o.size for o in index.objects) == g.nbytes + r.nbytes + 3 * 8 + 8 + 8

    for specs in (["y", UNSHARDED], [UNSHARDED, "x"], ["x", "y"]):
        target = ShardedArray((8, 6), np.float32, Layout(specs, mesh))
        Checkpoint(w=target).read(path).expect_partial()
        assert np.array_equal(target.to_numpy(), g), specs
    whole = np.zeros((8, 6), np.float32)
    Checkpoint(w=whole).read(path).expect_partial()  # sharded checkpoint -> plain array
    assert np.array_equal(whole, g)
    assert np.array_equal(cloudckpt.load_variable(path, "w"), g)

    plain = Checkpoint(w=g).save(tmp_path / "plain")  # plain checkpoint -> sharded target
    target = ShardedArray((8, 6), np.float32, Layout([UNSHARDED, "y"], mesh))
    Checkpoint(w=target).restore(plain).assert_consumed()
    assert np.array_equal(target.to_numpy(), g)


def test_partial_reads_are_verified_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resharding restore reads part of a stored shard: it reads whole 1 MiB checksum blocks and checks them."""
    from cloudckpt.restoring import array_reads as reader
    from cloudckpt.storage.checksum import CRC_BLOCK

    mesh = local_mesh((2,), ("x",))
    g = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB, 2 shards of 2 MiB
    path = DTensorCheckpoint(mesh, w=ShardedArray.from_global(g, Layout(["x", UNSHARDED], mesh))).save(tmp_path / "ck")
    chunks = read_index(path).entries["w"].chunks
    assert [len(c.block_crc32c) for c in chunks] == [2, 2] and all(c.block_size == CRC_BLOCK for c in chunks)

    read: list[int] = []
    real = reader.read_coalesced
    monkeypatch.setattr(reader, "read_coalesced", lambda storage, requests: (
        read.append(sum(r.out.nbytes for r in requests)) or real(storage, requests)))
    quarter = ShardedArray((1024, 1024), np.float32, Layout(["x", UNSHARDED], local_mesh((4,), ("x",))))
    Checkpoint(w=quarter).read(path).expect_partial()  # 4 hosts' worth: each stored shard read in halves
    assert np.array_equal(quarter.to_numpy(), g)
    # The quarters fall on block boundaries: nothing is read beyond what is needed (+ the 8-byte save_counter).
    assert sum(read) == g.nbytes + 8

    data = next(p for p in tmp_path.iterdir() if ".data-" in p.name)
    chunk = chunks[0]
    raw = bytearray(data.read_bytes())
    raw[chunk.offset + CRC_BLOCK + 5] ^= 0x01  # a byte in the second block of the first shard
    data.write_bytes(bytes(raw))
    top = ShardedArray((1024, 1024), np.float32, Layout(["x", UNSHARDED], local_mesh((4,), ("x",))))
    with pytest.raises(ChecksumError, match=r"'w'.*bytes \[\d+, \d+\)"):
        Checkpoint(w=top).read(path).expect_partial()
    rows = ShardedArray((1024, 1024), np.float32, Layout([UNSHARDED, "x"], local_mesh((2,), ("x",))))
    with pytest.raises(ChecksumError):  # columns: strided reads that cross the damaged block
        Checkpoint(w=rows).read(path).expect_partial()


def test_a_resharding_restore_reads_whole_rows_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of a stored shard land straight in the new shard's memory; only the margins that
    complete their first and last checksum blocks go through scratch buffers, and are verified."""
    from cloudckpt.restoring import array_reads as reader
    from cloudckpt.storage.checksum import CRC_BLOCK

    g = np.random.default_rng(1).standard_normal((1000, 1024)).astype(np.float32)  # 2 shards of 500 rows
    mesh = local_mesh((2,), ("x",))
    path = DTensorCheckpoint(mesh, w=ShardedArray.from_global(g, Layout(["x", UNSHARDED], mesh))).save(tmp_path / "ck")
    requests: list[Any] = []
    real = reader.read_coalesced
    monkeypatch.setattr(reader, "read_coalesced", lambda storage, batch: (
        requests.extend(batch) or real(storage, batch)))

    def restore() -> ShardedArray:
        quarter = ShardedArray((1000, 1024), np.float32, Layout(["x", UNSHARDED], local_mesh((4,), ("x",))))
        Checkpoint(w=quarter).read(path).expect_partial()  # 250 rows each: not on block boundaries
        return quarter

    quarter = restore()
    assert np.array_equal(quarter.to_numpy(), g)
    shards = quarter.local_shards
    in_place = [r for r in requests if any(np.shares_memory(np.frombuffer(r.out, np.uint8), s) for s in shards)]
    scratch = [r for r in requests if r not in in_place and r.out.nbytes > 8]  # (8: save_counter)
    assert sum(r.out.nbytes for r in in_place) == g.nbytes  # every needed byte straight into place
    assert scratch and all(r.out.nbytes < CRC_BLOCK for r in scratch)  # margins only, each under a block

    data = next(p for p in tmp_path.iterdir() if ".data-" in p.name)
    chunk = read_index(path).entries["w"].chunks[0]
    raw = bytearray(data.read_bytes())
    raw[chunk.offset + 250 * 1024 * 4 + 7] ^= 0x01  # in rows 250+: a margin of the first quarter's last block
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"'w'"):
        restore()


def test_a_stored_chunk_many_new_shards_need_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 small stored chunks, restored as 64 one-row shards (each needs a row of 8 chunks) and as
    4 replicas: every stored byte is read once, verified once and copied where it is needed."""
    from cloudckpt.restoring import array_reads as reader

    g = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    grid = local_mesh((8, 8), ("x", "y"))
    path = DTensorCheckpoint(grid, w=ShardedArray.from_global(g, Layout(["x", "y"], grid))).save(tmp_path / "ck")
    read: list[int] = []
    real = reader.read_coalesced
    monkeypatch.setattr(reader, "read_coalesced", lambda storage, requests: (
        read.append(sum(r.out.nbytes for r in requests)) or real(storage, requests)))
    rows = ShardedArray((64, 64), np.float32, Layout(["m", UNSHARDED], local_mesh((64,), ("m",))))
    Checkpoint(w=rows).read(path).expect_partial()
    assert np.array_equal(rows.to_numpy(), g) and sum(read) == g.nbytes + 8  # (+ save_counter)
    read.clear()
    replicas = ShardedArray((64, 64), np.float32, Layout.replicated(local_mesh((4,), ("m",)), 2))
    Checkpoint(w=replicas).read(path).expect_partial()
    assert all(np.array_equal(shard, g) for shard in replicas.local_shards) and sum(read) == g.nbytes + 8


def test_single_process_async_sharded_save(tmp_path: Path) -> None:
    mesh = local_mesh()
    g = np.arange(48, dtype=np.int32).reshape(6, 8)
    w = ShardedArray.from_global(g, Layout([UNSHARDED, "y"], mesh))
    ckpt = DTensorCheckpoint(mesh, w=w)
    path = ckpt.save(tmp_path / "ck", options=CheckpointOptions(enable_async=True))
    for shard in w.local_shards:
        shard[...] = -1  # after the snapshot: must not reach the checkpoint
    ckpt.sync(timeout=60)
    target = ShardedArray((6, 8), np.int32, Layout(["x", "y"], mesh))
    Checkpoint(w=target).read(path).expect_partial()
    assert np.array_equal(target.to_numpy(), g)
    assert cloudckpt.latest_checkpoint(tmp_path) == path


class FailingStorage(LocalStorage):
    def _put_whole(self, full_key: str, buffers: Any, mode: Any, metadata: Any) -> Any:
        if ".data-" in full_key:
            raise OSError("injected: no space left")
        return super()._put_whole(full_key, buffers, mode, metadata)


def test_single_process_failure_leaves_no_index(tmp_path: Path) -> None:
    mesh = local_mesh()
    w = ShardedArray.from_global(np.ones((4, 4)), Layout(["x", "y"], mesh))
    ckpt = DTensorCheckpoint(mesh, w=w)
    good = ckpt.save(tmp_path / "ck")
    register_storage(FailingStorage(str(tmp_path)))
    with pytest.raises(DistributedSaveError, match=r"rank 0: .*injected: no space left") as info:
        ckpt.save(tmp_path / "ck")
    assert info.value.failures.keys() == {0} and not info.value.committed
    assert cloudckpt.latest_checkpoint(tmp_path) == good
    assert not list(tmp_path.glob("ck-2*"))


def test_state_that_cannot_be_collected_fails_the_save_for_every_rank(tmp_path: Path) -> None:
    mesh = local_mesh()
    with pytest.raises(DistributedSaveError, match="rank 0: ValueError: cannot checkpoint 'd/x'") as info:
        DTensorCheckpoint(mesh, d={"x": object()}).save(tmp_path / "ck")
    assert info.value.failures.keys() == {0}
    assert not list(tmp_path.iterdir())


class LosesCommitter(LocalCoordinator):
    """The outcome broadcast fails: as if the committing host died right after the index PUT."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        raise CoordinationError("rank 0: connection closed by peer")


def test_committer_lost_after_commit_reports_a_complete_checkpoint(tmp_path: Path) -> None:
    mesh = Mesh(["x"], [1], coordinator=LosesCommitter())
    w = ShardedArray.from_global(np.arange(4.0), Layout(["x"], mesh))
    with pytest.raises(DistributedSaveError, match="complete and valid") as info:
        DTensorCheckpoint(mesh, w=w).write(tmp_path / "ck")
    assert info.value.committed
    target = np.zeros(4)
    Checkpoint(w=target).read(tmp_path / "ck").expect_partial()
    assert np.array_equal(target, np.arange(4.0))


# ---------------------------------------------------------------------------- real process groups
def spawn(target: Callable[..., None], world: int, *args: Any) -> list[dict[str, Any]]:
    """Run ``target(rank, world, port, *args, out_dir)`` in ``world`` spawned processes; their reports."""
    return spawn_reports(target, world, *args, timeout=SPAWN_TIMEOUT)


@pytest.fixture(scope="module")
def four(s3_root: str) -> list[dict[str, Any]]:
    return spawn(distributed_worker.four_hosts, 4, s3_root)


def test_four_hosts_write_each_replica_once(four: list[dict[str, Any]], s3_root: str) -> None:
    path = four[0]["save_path"]
    assert path == f"{s3_root}/ck-1"
    index = read_index(path)
    chunks = {p: len(e.chunks) for p, e in index.entries.items() if hasattr(e, "chunks")}
    assert chunks == {"save_counter": 1, "W": 4, "B": 2, "R": 1, "model/weight": 2, "model/bias": 1, "step": 1}
    stored = sum(o.size for o in index.objects)
    unique = sum(c.length for e in index.entries.values() for c in getattr(e, "chunks", ()))
    written = [r["save_counts"].get("data_bytes_written", 0) for r in four]
    assert stored == unique == sum(written)  # every distinct box written exactly once, by exactly one host
    assert all(w > 0 for w in written)  # replicas spread over the hosts, not piled on rank 0
    suffixes = {o.name.rsplit(".", 1)[1] for o in index.objects}
    assert len(suffixes) == 1 and len(index.objects) >= 4
    assert [o.name.split(".data-")[1][:14] for o in index.objects] == [
        f"{k:05d}-of-{len(index.objects):05d}" for k in range(len(index.objects))]
    assert index.entries["meta/name"].value == "run"  # type: ignore[union-attr]


def test_four_hosts_restore_another_layout_reading_only_their_ranges(four: list[dict[str, Any]]) -> None:
    for report in four:
        rank = report["rank"]
        assert report["restore_problems"] == [], rank
        x = rank // 2
        needed = (4 * 6 * 4) + 7 * 8 + (3 if x == 0 else 2) * 3 * 8 + 6 * 2 * 4 + 6 * 4 + 8 + 8
        assert report["restore_counts"]["data_bytes_read"] == needed, rank


def test_io_device_only_that_rank_touches_storage(four: list[dict[str, Any]], s3_root: str) -> None:
    for report in four:
        counts = report["io_counts"]
        assert report["io_problems"] == []
        if report["rank"] == 2:
            assert counts["io"] > 0 and counts["main"] == 0
            assert report["io_restore_counts"]["io"] > 0 and report["io_restore_counts"]["main"] == 0
        else:  # neither the save nor the restore made a single storage request on the other hosts
            assert counts == {"main": 0, "io": 0, "io_data_bytes_written": 0}, report["rank"]
            assert report["io_restore_counts"] == {"main": 0, "io": 0}, report["rank"]
    regular = read_index(f"{s3_root}/ck-1")
    routed = read_index(f"{s3_root}/io/ck-io")

    def boxes(index: Any) -> dict[str, Any]:
        return {p: sorted((c.start, c.shape, c.crc32c) for c in e.chunks) if hasattr(e, "chunks") else e
                for p, e in index.entries.items()}

    assert boxes(regular) == boxes(routed)  # the same checkpoint, byte for byte per chunk
    assert four[2]["io_counts"]["io_data_bytes_written"] == sum(o.size for o in routed.objects)


def test_async_save_on_four_hosts(four: list[dict[str, Any]], s3_root: str) -> None:
    for report in four:
        assert report["async_equal"] is True
        assert report["async_path"] == report["async_latest"] == f"{s3_root}/ck-2"


def test_failing_rank_fails_every_rank_and_keeps_the_previous_checkpoint(four: list[dict[str, Any]],
                                                                        s3_root: str) -> None:
    for report in four:
        failure = report["failure"]
        assert failure is not None, report["rank"]
        assert failure["ranks"] == [1] and not failure["committed"]
        assert "rank 1: " in failure["message"] and "injected failure" in failure["message"]
        assert report["latest_after_failure"] == f"{s3_root}/ck-2"
    storage = resolve(f"{s3_root}/x").storage
    assert [m.key for m in storage.list("ck-3")] == []  # no index, and every host removed its data


@pytest.fixture(scope="module")
def two(four: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return spawn(distributed_worker.two_hosts, 2, four[0]["save_path"])


def test_restore_on_two_hosts_and_on_one(four: list[dict[str, Any]], two: list[dict[str, Any]], s3_root: str) -> None:
    path = four[0]["save_path"]
    index = read_index(path)
    total = sum(o.size for o in index.objects)
    for report in two:
        assert report["problems"] == [], report["rank"]
        assert 0 < report["counts"]["data_bytes_read"] < total  # each host fetched a part, not everything
    # One index read per job: rank 0 HEADs and GETs it, validates it, broadcasts it; rank 1 makes none.
    assert [report["counts"].get("index_requests", 0) for report in two] == [2, 0]

    g = distributed_worker.global_arrays()
    w, b, r = np.zeros((8, 6), np.float32), np.zeros(7, np.int64), np.zeros((5, 3))
    model = torch.nn.Linear(4, 6)
    meta: dict[str, Any] = {"lr": 0.0, "name": "", "rank_free": [0, 0]}
    step = Variable(0)
    Checkpoint(W=w, B=b, R=r, model=model, meta=meta, step=step).restore(path).assert_consumed()
    assert np.array_equal(w, g["W"]) and np.array_equal(b, g["B"]) and np.array_equal(r, g["R"])
    assert np.array_equal(model.weight.detach().numpy(), g["weight"])
    assert np.array_equal(model.bias.detach().numpy(), g["bias"])
    assert meta == {"lr": 0.5, "name": "run", "rank_free": [1, 2]} and int(step) == 7
    sharded = ShardedArray((8, 6), np.float32, Layout(["y", "x"], local_mesh()))
    Checkpoint(W=sharded).restore(path).expect_partial()
    assert np.array_equal(sharded.to_numpy(), g["W"])
    assert math.prod(sharded.shape) == 48


def test_manager_on_two_hosts_decides_once_and_everyone_agrees(two: list[dict[str, Any]], s3_root: str) -> None:
    """Rank 0 alone reads/writes the state file and deletes; both ranks see the same decisions."""
    managed = f"{s3_root}/managed"
    for report in two:
        assert report["managed_initial"] is None
        # checkpoint_interval=2 from step 1: saves at steps 1, 3, 5, 7 on both ranks, numbered alike.
        assert report["managed_saved"] == [f"{managed}/ckpt-1", None, f"{managed}/ckpt-2", None,
                                           f"{managed}/ckpt-3", None, f"{managed}/ckpt-4"]
        assert report["managed_checkpoints"] == [f"{managed}/ckpt-3", f"{managed}/ckpt-4"]
        assert report["managed_latest"] == f"{managed}/ckpt-4"
        assert report["managed_resumed"] == f"{managed}/ckpt-4"
        assert report["managed_resumed_step"] == 7 and report["managed_resumed_ok"]
        # The preemption notice reached rank 1 only; both saved at that same step and "exited".
        assert report["managed_preempted_at"] == 9 and report["managed_exits"] == 1
        # Another writer claimed the directory: the fenced save fails on every rank, not only the owner.
        assert report["managed_fenced"] is not None and "another writer took over" in report["managed_fenced"]
    # Rank 1's bytes of the newest checkpoint were damaged: both ranks warned and resumed from the one before.
    for report in two:
        assert report["damaged_resumed"] == f"{s3_root}/damaged/ckpt-1", report["rank"]
        assert report["damaged_values_ok"] and any("ckpt-2 is damaged" in m for m in report["damaged_warned"])
    owner, other = two
    # The last save was incremental: rank 0's unchanged rows are ckpt-3's bytes, rank 1's are new.
    assert owner["managed_w_chunks"] == {"[0, 0]": "ckpt-3", "[4, 0]": "ckpt-4"}
    assert owner["managed_counts"]["DELETE"] > 0 and owner["managed_counts"]["HEAD"] > 0
    # Rank 1 only uploaded its shards (one PUT per save) and, on resume, read its ranges.
    assert set(other["managed_counts"]) == {"PUT", "data_bytes_written"} and other["managed_counts"]["PUT"] == 4
    # On resume rank 1 only reads its ranges: the owner alone reads the state file, HEAD-checks the
    # latest checkpoint, and reads the index once for the whole job (broadcast).
    assert set(other["managed_resume_counts"]) == {"GET", "data_bytes_read"}
    assert owner["managed_resume_counts"]["index_requests"] >= 2
    assert other["managed_resume_counts"]["GET"] < owner["managed_resume_counts"]["GET"]  # no state file read
    state = parse(resolve(f"{managed}/x").storage.get(STATE_KEY).decode(), "state")
    assert state.model_checkpoint_path == "ckpt-100"  # the other writer's save; ours never overwrote it
