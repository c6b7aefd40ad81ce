"""Functions run inside spawned ``torch.distributed`` (gloo) processes by tests/test_distributed.py.

Each process runs several scenarios in one group (starting torch dominates the cost) and
fills its ``report`` dict with what it saw, as plain data (``cloudckpt.testing.processes``
writes it out, or the traceback of a crash); the test asserts on those.
Storage requests are counted per process by registering a counting S3 storage for the
checkpoint directories, so a test can prove which process touched storage and how many
bytes of data objects each one read or wrote.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np

GLOBALS_SEED = 0


def global_arrays() -> dict[str, np.ndarray[Any, Any]]:
    """The global values every scenario saves (each process takes its shards)."""
    return {
        "W": np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7,
        "B": np.arange(7, dtype=np.int64) * 3 - 5,
        "R": np.linspace(-1, 1, 15).reshape(5, 3),
        "weight": (np.arange(24, dtype=np.float32).reshape(6, 4) - 3) / 5,
        "bias": np.arange(6, dtype=np.float32) / 3,
    }


def counting_storage(url: str) -> Any:
    """An S3 storage that counts its requests and the data-object bytes it moves (per process)."""
    from cloudckpt.storage.s3 import S3Storage

    class Counting(S3Storage):
        def __init__(self, root: str) -> None:
            super().__init__(root)
            self.counts: Counter[str] = Counter()
            self.fail_data_puts = False
            self._lock = threading.Lock()

        def _count(self, op: str, n: int = 1) -> None:
            with self._lock:
                self.counts[op] += n

        def _head(self, full_key: str) -> Any:
            self._count("HEAD")
            if full_key.endswith(".index"):
                self._count("index_requests")
            return super()._head(full_key)

        def _get_range(self, full_key: str, byte_range: Any) -> bytes:
            self._count("GET")
            if full_key.endswith(".index"):
                self._count("index_requests")
            data = super()._get_range(full_key, byte_range)
            if ".data-" in full_key:
                self._count("data_bytes_read", len(data))
            return data

        def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
            self._count("GET")
            super()._read_into(full_key, offset, outs)
            if ".data-" in full_key:
                self._count("data_bytes_read", sum(out.nbytes for out in outs))

        def _put_whole(self, full_key: str, buffers: Sequence[memoryview], mode: Any,
                       metadata: Mapping[str, str]) -> Any:
            self._count("PUT")
            if ".data-" in full_key:
                if self.fail_data_puts:
                    raise OSError("injected failure: disk on fire")
                self._count("data_bytes_written", sum(b.nbytes for b in buffers))
            return super()._put_whole(full_key, buffers, mode, metadata)

        def _begin_multipart(self, full_key: str, mode: Any, metadata: Mapping[str, str], size: int,
                             part_size: int) -> Any:
            self._count("PUT")
            return super()._begin_multipart(full_key, mode, metadata, size, part_size)

        def _delete_many(self, full_keys: Sequence[str]) -> None:
            self._count("DELETE")
            super()._delete_many(full_keys)

        def _list(self, full_prefix: str) -> Iterator[Any]:
            self._count("LIST")
            return super()._list(full_prefix)

        def total_requests(self) -> int:
            return sum(v for k, v in self.counts.items() if k.isupper())

    return Counting(url)


def _init(rank: int, world: int, port: int) -> Any:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    from cloudckpt.distributed import TorchCoordinator
    return TorchCoordinator(timeout=30)


def _model(device_mesh: Any, placements: Sequence[Any], weight: np.ndarray[Any, Any] | None,
           bias: np.ndarray[Any, Any] | None) -> Any:
    """A Linear(4, 6) whose weight is a DTensor over ``device_mesh`` (the bias stays a plain tensor)."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    model = torch.nn.Linear(4, 6)
    with torch.no_grad():
        w = torch.from_numpy(weight.copy()) if weight is not None else torch.zeros(6, 4)
        model.weight = torch.nn.Parameter(distribute_tensor(w, device_mesh, list(placements)))
        model.bias.copy_(torch.from_numpy(bias.copy()) if bias is not None else torch.zeros(6))
    return model


def _local_box(dt: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from cloudckpt.distributed.torch_dtensor import dtensor_box
    return dtensor_box(dt)


def _check_sharded(name: str, array: Any, expected: np.ndarray[Any, Any], problems: list[str]) -> None:
    for (start, extent), shard in zip(array.local_boxes(), array.local_shards, strict=True):
        box = tuple(slice(s, s + n) for s, n in zip(start, extent, strict=True))
        if not np.array_equal(shard, expected[box]):
            problems.append(f"{name} shard at {start} differs")


def _check_model(model: Any, g: Mapping[str, np.ndarray[Any, Any]], problems: list[str]) -> None:
    start, extent = _local_box(model.weight)
    box = tuple(slice(s, s + n) for s, n in zip(start, extent, strict=True))
    if not np.array_equal(model.weight.to_local().detach().numpy(), g["weight"][box]):
        problems.append(f"model.weight local shard at {start} differs")
    if not np.array_equal(model.bias.detach().numpy(), g["bias"]):
        problems.append("model.bias differs")


def _check_restored(w: Any, b: Any, r: Any, model: Any, g: Mapping[str, np.ndarray[Any, Any]]) -> list[str]:
    """What differs between the restored W, B, R and model and the global values."""
    problems: list[str] = []
    _check_sharded("W", w, g["W"], problems)
    _check_sharded("B", b, g["B"], problems)
    _check_sharded("R", r, g["R"], problems)
    _check_model(model, g, problems)
    return problems


def four_hosts(rank: int, world: int, port: int, root: str, report: dict[str, Any]) -> None:
    """Spawned 4x: save on a 2x2 mesh, restore with another layout, io_device, async save, a failing rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    import cloudckpt
    from cloudckpt import UNSHARDED, CheckpointOptions, DTensorCheckpoint, Layout, Mesh, ShardedArray, Variable
    from cloudckpt.distributed import DistributedSaveError
    from cloudckpt.restoring import array_reads as reader_module
    from cloudckpt.storage import register_storage

    coordinator = _init(rank, world, port)
    device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("x", "y"))
    mesh = Mesh.from_device_mesh(device_mesh, coordinator=coordinator)
    storage = counting_storage(root)
    io_storage = counting_storage(f"{root}/io")
    register_storage(storage)
    register_storage(io_storage)
    g = global_arrays()

    # 1. save: W fully sharded, B split over y (replicated over x, uneven 4/3), R replicated
    #    everywhere, a DTensor weight [Shard(0), Replicate()] inside a module's state_dict, scalars.
    w = ShardedArray.from_global(g["W"], Layout(["x", "y"], mesh))
    b = ShardedArray.from_global(g["B"], Layout(["y"], mesh))
    r = ShardedArray.from_global(g["R"], Layout.replicated(mesh, 2))
    model = _model(device_mesh, [Shard(0), Replicate()], g["weight"], g["bias"])
    meta = {"lr": 0.5, "name": "run", "rank_free": [1, 2]}
    ckpt = DTensorCheckpoint(mesh, W=w, B=b, R=r, model=model, meta=meta, step=Variable(7))
    path = ckpt.save(f"{root}/ck")
    report["save_path"] = path
    report["save_counts"] = dict(storage.counts)
    dist.barrier()

    # 2. restore on the same 4 hosts with other layouts; exact byte ranges (no gap reads, and no
    #    widening to checksum blocks - tests/test_distributed.py checks that part on its own).
    reader_module.MAX_READ_WASTE = 0
    reader_module.VERIFY_PARTIAL_READS = False
    storage.counts.clear()
    w2 = ShardedArray((8, 6), np.float32, Layout(["y", UNSHARDED], mesh))
    b2 = ShardedArray((7,), np.int64, Layout.replicated(mesh, 1))
    r2 = ShardedArray((5, 3), np.float64, Layout(["x", UNSHARDED], mesh))
    model2 = _model(device_mesh, [Replicate(), Shard(1)], None, None)
    meta2: dict[str, Any] = {"lr": 0.0, "name": "", "rank_free": [0, 0]}
    step2 = Variable(0)
    DTensorCheckpoint(mesh, W=w2, B=b2, R=r2, model=model2, meta=meta2, step=step2).restore(path).assert_consumed()
    problems = _check_restored(w2, b2, r2, model2, g)
    if meta2 != meta or int(step2) != 7:
        problems.append(f"scalars differ: {meta2} {int(step2)}")
    report["restore_problems"] = problems
    report["restore_counts"] = dict(storage.counts)
    reader_module.MAX_READ_WASTE = 1024 * 1024
    reader_module.VERIFY_PARTIAL_READS = True
    dist.barrier()

    # 3. io_device: only rank 2 may touch storage; same checkpoint.
    storage.counts.clear()
    io_storage.counts.clear()
    options = CheckpointOptions(experimental_io_device="/job:worker/replica:0/task:2")
    io_path = ckpt.write(f"{root}/io/ck-io", options=options)
    report["io_counts"] = {"main": storage.total_requests(), "io": io_storage.total_requests(),
                           "io_data_bytes_written": io_storage.counts["data_bytes_written"]}
    dist.barrier()
    w3 = ShardedArray((8, 6), np.float32, Layout(["x", UNSHARDED], mesh))
    DTensorCheckpoint(mesh, W=w3).read(io_path).expect_partial()
    problems = []
    _check_sharded("W", w3, g["W"], problems)
    # ... and restoring with io_device: rank 2 reads for everyone, onto yet another layout.
    dist.barrier()
    storage.counts.clear()
    io_storage.counts.clear()
    w5 = ShardedArray((8, 6), np.float32, Layout([UNSHARDED, "y"], mesh))
    b5 = ShardedArray((7,), np.int64, Layout(["x"], mesh))
    DTensorCheckpoint(mesh, W=w5, B=b5).read(io_path, options=options).expect_partial()
    _check_sharded("W (io_device restore)", w5, g["W"], problems)
    _check_sharded("B (io_device restore)", b5, g["B"], problems)
    report["io_restore_counts"] = {"main": storage.total_requests(), "io": io_storage.total_requests()}
    report["io_problems"] = problems
    dist.barrier()

    # 4. async save of changed values (ck-2), committed when every host is done.
    w.local_shards[0][...] += 1
    async_path = ckpt.save(f"{root}/ck", options=CheckpointOptions(enable_async=True))
    ckpt.sync(timeout=120)
    w4 = ShardedArray((8, 6), np.float32, Layout(["x", "y"], mesh))
    DTensorCheckpoint(mesh, W=w4).read(async_path).expect_partial()
    report["async_path"] = async_path
    report["async_equal"] = all(np.array_equal(a, b) for a, b in zip(w.local_shards, w4.local_shards, strict=True))
    report["async_latest"] = cloudckpt.latest_checkpoint(root)
    dist.barrier()

    # 5. rank 1 fails while uploading: every rank gets the error; ck-2 stays the latest.
    storage.fail_data_puts = rank == 1
    try:
        ckpt.save(f"{root}/ck")
        report["failure"] = None
    except DistributedSaveError as exc:
        report["failure"] = {"message": str(exc), "ranks": sorted(exc.failures), "committed": exc.committed}
    storage.fail_data_puts = False
    dist.barrier()
    report["latest_after_failure"] = cloudckpt.latest_checkpoint(root)
    dist.barrier()
    dist.destroy_process_group()


def two_hosts(rank: int, world: int, port: int, path: str, report: dict[str, Any]) -> None:
    """Spawned 2x: restore the 4-host checkpoint onto a 1-D mesh of 2, default read gaps."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from cloudckpt import UNSHARDED, DTensorCheckpoint, Layout, Mesh, ShardedArray, Variable
    from cloudckpt.storage import register_storage

    coordinator = _init(rank, world, port)
    device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("x",))
    mesh = Mesh.from_device_mesh(device_mesh, coordinator=coordinator)
    storage = counting_storage(path.rsplit("/", 1)[0])
    register_storage(storage)
    g = global_arrays()
    w = ShardedArray((8, 6), np.float32, Layout([UNSHARDED, "x"], mesh))  # columns: partial chunk reads
    b = ShardedArray((7,), np.int64, Layout(["x"], mesh))
    r = ShardedArray((5, 3), np.float64, Layout([UNSHARDED, "x"], mesh))
    model = _model(device_mesh, [Shard(1)], None, None)
    meta: dict[str, Any] = {"lr": 0.0, "name": "", "rank_free": [0, 0]}
    step = Variable(0)
    DTensorCheckpoint(mesh, W=w, B=b, R=r, model=model, meta=meta, step=step).restore(path).assert_consumed()
    problems = _check_restored(w, b, r, model, g)
    if meta["name"] != "run" or int(step) != 7:
        problems.append("scalars differ")
    report["problems"] = problems
    report["counts"] = dict(storage.counts)
    dist.barrier()
    _managed(rank, mesh, path.rsplit("/", 1)[0] + "/managed", report)
    dist.barrier()
    _resume_past_damage(rank, mesh, path.rsplit("/", 1)[0] + "/damaged", report)
    dist.barrier()
    dist.destroy_process_group()


def _resume_past_damage(rank: int, mesh: Any, directory: str, report: dict[str, Any]) -> None:
    """Only rank 1's bytes of the latest checkpoint are damaged: both ranks resume from the one before."""
    import warnings

    from cloudckpt import UNSHARDED, CheckpointManager, DTensorCheckpoint, Layout, ShardedArray
    from cloudckpt.format import object_checkpoint
    from cloudckpt.format.index_fetch import load_index
    from cloudckpt.storage import open_storage

    g = global_arrays()
    w = ShardedArray.from_global(g["W"], Layout(["x", UNSHARDED], mesh))
    manager = CheckpointManager(DTensorCheckpoint(mesh, W=w), directory, max_to_keep=3, incremental=False)
    for i in (1, 2):
        for box, shard in zip(w.local_boxes(), w.local_shards, strict=True):
            shard[...] = g["W"][_slices(box)] + i
        manager.save()
    mesh.coordinator.barrier()
    if rank == 0:  # flip a byte in the object holding rank 1's rows (4-7) of ckpt-2
        storage = open_storage(directory)
        index = load_index(storage, "ckpt-2")
        chunk = next(c for c in index.entries["W"].chunks if c.start[0] == 4)  # type: ignore[union-attr]
        key = index.objects[chunk.object].name
        assert object_checkpoint(key) == "ckpt-2"
        raw = bytearray(storage.get(key))
        raw[chunk.offset + 3] ^= 0x01
        storage.put(key, bytes(raw))
    mesh.coordinator.barrier()
    fresh = ShardedArray((8, 6), np.float32, Layout(["x", UNSHARDED], mesh))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = CheckpointManager(DTensorCheckpoint(mesh, W=fresh), directory, max_to_keep=3).restore_or_initialize()
    report["damaged_resumed"] = resumed
    report["damaged_warned"] = [str(c.message) for c in caught if "damaged" in str(c.message)]
    report["damaged_values_ok"] = all(np.array_equal(shard, g["W"][_slices(box)] + 1)
                                      for box, shard in zip(fresh.local_boxes(), fresh.local_shards, strict=True))


def _managed(rank: int, mesh: Any, directory: str, report: dict[str, Any]) -> None:
    """A CheckpointManager over a DTensorCheckpoint on 2 hosts: one owner, shared decisions, preemption."""
    from cloudckpt import (
        UNSHARDED,
        CheckpointManager,
        DTensorCheckpoint,
        Layout,
        PreemptionCheckpointHandler,
        ShardedArray,
        Variable,
    )
    from cloudckpt.errors import ConcurrentWriterError
    from cloudckpt.storage import register_storage

    storage = counting_storage(directory)
    register_storage(storage)
    g = global_arrays()
    step = Variable(0)
    w = ShardedArray.from_global(g["W"], Layout(["x", UNSHARDED], mesh))
    manager = CheckpointManager(DTensorCheckpoint(mesh, W=w, step=step), directory, max_to_keep=2,
                                step_counter=step, checkpoint_interval=2)
    report["managed_initial"] = manager.restore_or_initialize()
    saved = []
    for i in range(1, 8):
        step.assign(i)
        for box, shard in zip(w.local_boxes(), w.local_shards, strict=True):
            # rank 0's rows stop changing after step 5: the save at 7 (incremental) reuses them
            shard[...] = g["W"][_slices(box)] + (min(i, 5) if rank == 0 else i)
        saved.append(manager.save())
    report["managed_saved"] = saved
    report["managed_checkpoints"] = manager.checkpoints
    report["managed_latest"] = manager.latest_checkpoint
    report["managed_counts"] = dict(storage.counts)
    if rank == 0:
        from cloudckpt.format import object_checkpoint
        from cloudckpt.format.index_fetch import load_index

        index = load_index(storage, "ckpt-4")
        report["managed_w_chunks"] = {str(list(c.start)): object_checkpoint(index.objects[c.object].name)
                                      for c in index.entries["W"].chunks}  # type: ignore[union-attr]
    expected_w = g["W"] + 7
    expected_w[:4] = g["W"][:4] + 5  # rank 0 holds rows 0-3

    # A fresh manager on every rank resumes from the same checkpoint, decided by rank 0.
    storage.counts.clear()
    step2 = Variable(0)
    w2 = ShardedArray((8, 6), np.float32, Layout([UNSHARDED, "x"], mesh))
    resumed = CheckpointManager(DTensorCheckpoint(mesh, W=w2, step=step2), directory, max_to_keep=2,
                                step_counter=step2, checkpoint_interval=2)
    report["managed_resumed"] = resumed.restore_or_initialize()
    report["managed_resumed_step"] = int(step2)
    report["managed_resumed_ok"] = all(  # another layout (columns) restored from an incremental checkpoint
        np.array_equal(shard, expected_w[_slices(box)]) for box, shard in zip(w2.local_boxes(), w2.local_shards,
                                                                               strict=True))
    report["managed_resume_counts"] = dict(storage.counts)

    # Preemption noticed by rank 1 only: both ranks save at the same step.
    exits: list[int] = []
    handler = PreemptionCheckpointHandler(resumed, signals=(), exit_fn=lambda: exits.append(1))
    report["managed_preempted_at"] = None
    for i in range(8, 12):
        step2.assign(i)
        if rank == 1 and i == 9:
            handler.request_preemption()
        if handler.save_checkpoint_if_preempted() is not None:
            report["managed_preempted_at"] = i
            break
    report["managed_exits"] = len(exits)

    # Another writer claims the directory: the next save fails on every rank, not just the owner.
    if rank == 0:
        from cloudckpt import Checkpoint
        CheckpointManager(Checkpoint(v=Variable(1.0)), directory, max_to_keep=5).save(checkpoint_number=100)
    step2.assign(20)
    try:
        resumed.save()
        report["managed_fenced"] = None
    except ConcurrentWriterError as exc:
        report["managed_fenced"] = str(exc)


def _slices(box: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[slice, ...]:
    start, extent = box
    return tuple(slice(s, s + n) for s, n in zip(start, extent, strict=True))


def env_for_children(endpoint: str) -> dict[str, str]:
    """What the spawned processes need in their environment (they inherit ``os.environ``)."""
    return {"AWS_ENDPOINT_URL": endpoint, **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
