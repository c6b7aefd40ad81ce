"""Functions run in spawned processes by tests/test_jax*.py: jax with several CPU devices.

jax fixes its device count when it is first imported, and the pytest process may have
imported it already; so every scenario needing more devices runs here, in a process that
sets ``XLA_FLAGS`` before it imports jax (this module imports jax only inside functions).
Each function fills ``report`` with plain data (see ``cloudckpt.testing.processes``).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from cloudckpt.leaves.copier import DeviceArray, HostBytes, Pending
from cloudckpt.leaves.jax_array import JaxCopier


class CountingJaxCopier(JaxCopier):
    """The JAX copier, recording its batches; host memory it allocates starts as garbage and each
    copy can be delayed, so a read of a buffer before its batch completed would store wrong bytes."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.batches: list[int] = []
        self.completed = 0

    def allocate_host(self, nbytes: int) -> HostBytes:
        return np.full(nbytes, 0xAB, dtype=np.uint8)

    def to_host(self, batch: Sequence[tuple[DeviceArray, HostBytes]]) -> Pending:
        self.batches.append(len(batch))
        pending = super().to_host(batch)

        def finish() -> None:
            time.sleep(self.delay)
            pending.wait()
            self.completed += 1
        return self._submit(finish)  # the same one thread: after the copies, before any later batch


class CountingClient:
    """jax's distributed runtime client, counting the key-value reads a coordinator makes."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.gets = 0

    def blocking_key_value_get_bytes(self, key: str, timeout_ms: int) -> bytes:
        self.gets += 1
        return bytes(self._client.blocking_key_value_get_bytes(key, timeout_ms))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _start_jax(devices: int) -> Any:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    return jax


def global_values() -> dict[str, np.ndarray[Any, Any]]:
    """The global arrays every scenario saves (each process takes its shards)."""
    return {
        "w": (np.arange(8 * 16, dtype=np.float32).reshape(8, 16) - 40) / 7,
        "replicated": np.arange(12, dtype=np.int32).reshape(3, 4) * 5 - 7,
        "cols": (np.arange(6 * 4, dtype=np.int16).reshape(6, 4) - 9) * 3,
    }


def counting_storage(url: str) -> Any:
    """The storage ``url`` opens, counting the data-object bytes it moves, registered for ``url``.

    ``fail_data_puts`` makes its data-object writes fail (an upload failing on this process).
    """
    from cloudckpt.storage import open_storage, register_storage

    base: Any = type(open_storage(url))

    class Counting(base):  # type: ignore[misc]
        def __init__(self, root: str) -> None:
            super().__init__(root)
            self.counts: Counter[str] = Counter()
            self.fail_data_puts = False
            self._lock = threading.Lock()

        def _count(self, what: str, n: int) -> None:
            with self._lock:
                self.counts[what] += n

        def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
            super()._read_into(full_key, offset, outs)
            if ".data-" in full_key:
                self._count("data_bytes_read", sum(out.nbytes for out in outs))

        def _get_range(self, full_key: str, byte_range: Any) -> bytes:
            data: bytes = super()._get_range(full_key, byte_range)
            if ".data-" in full_key:
                self._count("data_bytes_read", len(data))
            return data

        def _put_whole(self, full_key: str, buffers: Sequence[memoryview], mode: Any, metadata: Any) -> Any:
            if ".data-" in full_key:
                if self.fail_data_puts:
                    raise OSError("injected failure: disk on fire")
                self._count("data_bytes_written", sum(b.nbytes for b in buffers))
            return super()._put_whole(full_key, buffers, mode, metadata)

        def _begin_multipart(self, full_key: str, mode: Any, metadata: Any, size: int, part_size: int) -> Any:
            if ".data-" in full_key:
                if self.fail_data_puts:
                    raise OSError("injected failure: disk on fire")
                self._count("data_bytes_written", size)
            return super()._begin_multipart(full_key, mode, metadata, size, part_size)

    storage = Counting(url)
    register_storage(storage)
    return storage


def _check(name: str, array: Any, expected: np.ndarray[Any, Any], sharding: Any, problems: list[str]) -> None:
    """``array`` has ``sharding`` and each addressable shard holds exactly its box of ``expected``."""
    if array.sharding != sharding:
        problems.append(f"{name}: sharding {array.sharding} != {sharding}")
    for shard in array.addressable_shards:
        want = expected[shard.index]
        got = np.asarray(shard.data)
        if got.dtype != want.dtype or got.tobytes() != np.ascontiguousarray(want).tobytes():
            problems.append(f"{name}: shard {shard.index} on {shard.device} differs")


def eight_devices(rank: int, world: int, port: int, root: str, report: dict[str, Any]) -> None:
    """Save a tree sharded over a (4, 2) mesh; restore it onto (2, 4), (8,), replicated and one device."""
    jax = _start_jax(8)
    from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

    import cloudckpt.jax as ccjax
    from cloudckpt.format.index_fetch import load_index
    from cloudckpt.leaves.jax_array import use_copier

    P: Any = PartitionSpec
    devices = jax.devices()
    report["devices"] = len(devices)
    g = global_values()
    mesh42 = jax.make_mesh((4, 2), ("x", "y"), devices=devices)
    placed = {
        "w": NamedSharding(mesh42, P("x", "y")),
        "replicated": NamedSharding(mesh42, P()),
        "cols": NamedSharding(mesh42, P(None, "y")),
    }
    tree = {name: jax.device_put(g[name], placed[name]) for name in g}
    tree["rng"] = jax.device_put(jax.random.key(3), NamedSharding(mesh42, P()))
    storage = counting_storage(root)
    copier = CountingJaxCopier()
    with use_copier(copier, cpu_arrays=True):  # the accelerator path: shards read through the copier's batches
        ccjax.save(f"{root}/sharded", tree)
    report["copied"] = sum(copier.batches)
    index = load_index(storage, "sharded")
    report["chunks"] = {k: len(getattr(index.entries[k], "chunks", ()))
                        for k in ("w", "replicated", "cols", "rng/key_data")}
    report["state_bytes"] = sum(int(v.nbytes) for v in g.values()) + 8 + 8  # + the key data, save_counter

    problems: list[str] = []
    mesh24 = jax.make_mesh((2, 4), ("x", "y"), devices=devices)
    mesh8 = jax.make_mesh((8,), ("x",), devices=devices[::-1])
    targets: dict[str, dict[str, Any]] = {
        "(2, 4) P('x', 'y')": {"w": NamedSharding(mesh24, P("x", "y")),
                               "replicated": NamedSharding(mesh24, P(None, "y")),
                               "cols": NamedSharding(mesh24, P("x", "y"))},
        "(8,) P(None, 'x')": {"w": NamedSharding(mesh8, P(None, "x")), "replicated": NamedSharding(mesh8, P()),
                              "cols": NamedSharding(mesh8, P())},
        "replicated": {name: NamedSharding(mesh24, P()) for name in g},
        "one device": {name: SingleDeviceSharding(devices[5]) for name in g},
    }
    restored_on: list[str] = []
    bytes_read: dict[str, int] = {}
    report["restored"] = restored_on
    report["bytes_read"] = bytes_read
    for label, shardings in targets.items():
        like = {name: jax.ShapeDtypeStruct(g[name].shape, g[name].dtype, sharding=shardings[name]) for name in g}
        like["rng"] = jax.random.key(0)  # a jax.Array like: the restored key takes its (single-device) placement
        storage.counts.clear()
        try:
            restored = ccjax.restore(f"{root}/sharded", like)
        except Exception as exc:  # recorded, so one failing target does not hide the others
            problems.append(f"{label}: {exc!r}")
            continue
        bytes_read[label] = storage.counts["data_bytes_read"]
        for name in g:
            _check(f"{label} {name}", restored[name], g[name], shardings[name], problems)
        if np.asarray(jax.random.key_data(restored["rng"])).tobytes() != \
                np.asarray(jax.random.key_data(tree["rng"])).tobytes():
            problems.append(f"{label}: rng differs")
        restored_on.append(label)
    report["problems"] = problems


def _needed_bytes(like: dict[str, Any]) -> int:
    """The bytes of the distinct boxes this process's devices hold, over every array of ``like``."""
    total = 0
    for value in like.values():
        shape = tuple(value.shape)
        boxes = {tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=True))
                 for index in value.sharding.addressable_devices_indices_map(shape).values()}
        total += sum(int(np.prod([hi - lo for lo, hi in box])) for box in boxes) * np.dtype(value.dtype).itemsize
    return total


def two_processes(rank: int, world: int, port: int, root: str, report: dict[str, Any]) -> None:
    """2 processes x 2 CPU devices on JAX's distributed runtime: managed saves (sync, async), a failed
    upload, restore onto another mesh, resume; every storage request of this process counted."""
    jax = _start_jax(2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=world, process_id=rank,
                               coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60)
    from jax.sharding import NamedSharding, PartitionSpec

    import cloudckpt
    import cloudckpt.jax as ccjax
    from cloudckpt import CheckpointManager, CheckpointOptions, PreemptionCheckpointHandler
    from cloudckpt.errors import SaveError

    P: Any = PartitionSpec
    SDS: Any = jax.ShapeDtypeStruct
    report["devices"] = [jax.local_device_count(), jax.device_count()]
    g = global_values()
    mesh = jax.make_mesh((2, 2), ("x", "y"))  # process 0 holds row x=0 of the mesh
    placed = {"w": NamedSharding(mesh, P("x", "y")), "replicated": NamedSharding(mesh, P()),
              "cols": NamedSharding(mesh, P(None, "y"))}

    def tree_of(offset: int) -> dict[str, Any]:
        arrays = {name: jax.make_array_from_callback(g[name].shape, placed[name], lambda i, n=name: g[n][i] + offset)
                  for name in g}
        return {**arrays, "rng": jax.random.key(11), "step": offset}

    directory = f"{root}/managed"
    storage = counting_storage(directory)
    coordinator = ccjax.jax_coordinator()

    # 1. a synchronous managed save: each process writes its own shards, replicated boxes once
    ckpt = ccjax.PyTreeCheckpoint(tree_of(0))
    manager = CheckpointManager(ckpt, directory, max_to_keep=2)
    storage.counts.clear()
    manager.save()
    report["written"] = storage.counts["data_bytes_written"]
    report["state_bytes"] = sum(int(v.nbytes) for v in g.values()) + 8 + 8  # + key data, save_counter
    coordinator.barrier()

    # 2. an async save: the collectives run on the background worker, on the key-value store
    async_manager = CheckpointManager(ckpt, directory, max_to_keep=2, options=CheckpointOptions(enable_async=True))
    ckpt.tree = tree_of(1)
    async_manager.save()
    ckpt.sync()
    report["latest"] = cloudckpt.latest_checkpoint(directory)
    coordinator.barrier()

    # 3. rank 1 fails its upload: every process gets the error, no ckpt-3, ckpt-2 stays the latest
    storage.fail_data_puts = rank == 1
    ckpt.tree = tree_of(2)
    try:
        async_manager.save(options=CheckpointOptions())
        report["failure"] = None
    except SaveError as exc:
        report["failure"] = type(exc).__name__
    storage.fail_data_puts = False
    coordinator.barrier()
    report["latest_after_failure"] = cloudckpt.latest_checkpoint(directory)
    report["ckpt3_exists"] = storage.exists("ckpt-3.index")
    coordinator.barrier()

    # 4. restore onto another mesh: 4 devices in a row, reversed - each process reads rows the other wrote
    mesh4 = jax.make_mesh((4,), ("x",), devices=jax.devices()[::-1])
    shardings = {"w": NamedSharding(mesh4, P("x", None)), "replicated": NamedSharding(mesh4, P()),
                 "cols": NamedSharding(mesh4, P(None, "x"))}
    like = {name: SDS(g[name].shape, g[name].dtype, sharding=shardings[name]) for name in g}
    storage.counts.clear()
    restored = ccjax.restore(f"{directory}/ckpt-2", {**like, "rng": jax.random.key(0), "step": 0})
    report["read"] = storage.counts["data_bytes_read"]
    report["needed"] = _needed_bytes(like) + 8 + 8
    problems: list[str] = []
    for name in g:
        _check(f"restored {name}", restored[name], g[name] + 1, shardings[name], problems)
    if restored["step"] != 1:
        problems.append(f"step {restored['step']}")
    coordinator.barrier()

    # 4b. a checkpoint one process wrote (the test's own, single device) restores sharded over both
    one = ccjax.restore(f"{root}/from-one", {"w": SDS(g["w"].shape, g["w"].dtype, sharding=placed["w"])})
    _check("from one process", one["w"], g["w"] + 5, placed["w"], problems)
    coordinator.barrier()

    # 5. a new manager resumes from the latest checkpoint into zeros
    fresh = ccjax.PyTreeCheckpoint({**{name: jax.numpy.zeros(g[name].shape, g[name].dtype, device=placed[name])
                                       for name in g}, "rng": jax.random.key(0), "step": -1})
    report["resumed"] = CheckpointManager(fresh, directory, max_to_keep=2).restore_or_initialize()
    for name in g:
        _check(f"resumed {name}", fresh.tree[name], g[name] + 1, placed[name], problems)
    report["resumed_counter"] = int(fresh.save_counter)
    report["problems"] = problems

    # 6. io_device: rank 1's shards travel to rank 0 over the key-value store, only rank 0 touches storage
    io_options = CheckpointOptions(experimental_io_device="/job:worker/task:0")
    storage.counts.clear()
    ccjax.PyTreeCheckpoint(tree_of(3)).write(f"{directory}/io", io_options)
    report["io_written"] = storage.counts["data_bytes_written"]
    io_ckpt = ccjax.PyTreeCheckpoint({name: SDS(g[name].shape, g[name].dtype, sharding=shardings[name]) for name in g})
    storage.counts.clear()
    io_ckpt.read(f"{directory}/io", io_options)
    report["io_read"] = storage.counts["data_bytes_read"]
    for name in g:
        _check(f"io {name}", io_ckpt.tree[name], g[name] + 3, shardings[name], problems)
    coordinator.barrier()

    # 7. a plain Checkpoint of sharded arrays: default_coordinator() knows the JAX job, so the save is coordinated
    try:
        cloudckpt.Checkpoint(state={"w": fresh.tree["w"]}).write(f"{root}/plain")
        target = {"w": jax.numpy.zeros(g["w"].shape, g["w"].dtype, device=placed["w"])}
        cloudckpt.Checkpoint(state=target).read(f"{root}/plain")
        _check("plain", target["w"], g["w"] + 1, placed["w"], problems)
        report["plain_checkpoint"] = "saved"
    except Exception as exc:
        report["plain_checkpoint"] = type(exc).__name__
    coordinator.barrier()

    # 8. a preemption notice on rank 1 only: both processes save at the same step (the flag combined over a
    #    JaxCoordinator of the training thread's own: no torch.distributed group exists in this job)
    handler = PreemptionCheckpointHandler(async_manager, exit_fn=lambda: None)
    try:
        for step in range(3):
            ckpt.tree = tree_of(10 + step)
            if rank == 1 and step == 1:
                handler.request_preemption()
            path = handler.save_checkpoint_if_preempted()
            if path is not None:
                report["preempted"] = [step, path, cloudckpt.latest_checkpoint(directory)]
                break
    except Exception as exc:
        report["preempted"] = type(exc).__name__
    finally:
        handler.close()
    coordinator.barrier()

    # 9. the collectives' cost on the key-value store: gather and broadcast read keys linear in the
    #    process count (not N on every rank), and no key outlives the collectives that read it
    probe = ccjax.JaxCoordinator()
    counting = CountingClient(probe._client)
    probe._client = counting
    gets: dict[str, int] = {}
    results: dict[str, Any] = {}
    for name, call in (("gather", lambda: probe.gather_object(rank * 10, dst=1)),
                       ("broadcast", lambda: probe.broadcast_object("hello" if rank == 0 else None, src=0)),
                       ("any", lambda: probe.any(rank == 1)),
                       ("all_gather", lambda: probe.all_gather_object(rank))):
        counting.gets = 0
        results[name] = call()
        gets[name] = counting.gets
    probe.barrier()
    probe.barrier()  # every rank has swept what it posted before the first one
    report["collective_gets"] = gets
    report["collective_results"] = results
    report["keys_left"] = len(counting.key_value_dir_get_bytes(probe._prefix))
    jax.distributed.shutdown()


def killed_mid_save(rank: int, world: int, port: int, root: str, report: dict[str, Any]) -> None:
    """2 processes: ckpt-1 saved; during the next save, rank 1 is SIGKILLed after uploading its data.

    Rank 0's save fails within its coordinator's timeout; ckpt-1 stays the latest, and no ckpt-2
    index exists. Short runtime timeouts, so the survivor also exits promptly.
    """
    jax = _start_jax(2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=world, process_id=rank,
                               coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60,
                               heartbeat_timeout_seconds=30, shutdown_timeout_seconds=2)
    from jax.sharding import NamedSharding, PartitionSpec

    import cloudckpt
    import cloudckpt.jax as ccjax
    from cloudckpt import CheckpointManager
    from cloudckpt._testhooks import CRASH_ENV
    from cloudckpt.errors import CloudCkptError

    P: Any = PartitionSpec
    g = global_values()
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    coordinator = ccjax.JaxCoordinator(timeout=5)  # short: the survivor learns of the death quickly
    ckpt = ccjax.PyTreeCheckpoint({"w": jax.make_array_from_callback(g["w"].shape, sharding, lambda i: g["w"][i])},
                                  coordinator=coordinator)
    directory = f"{root}/killed"
    manager = CheckpointManager(ckpt, directory, max_to_keep=2)
    manager.save()
    coordinator.barrier()
    ckpt.tree = {"w": jax.make_array_from_callback(g["w"].shape, sharding, lambda i: g["w"][i] + 1)}
    if rank == 1:
        os.environ[CRASH_ENV] = "after_data_upload"  # SIGKILL, as a preempted VM dies
    try:
        manager.save()
        report["second_save"] = "succeeded"
    except CloudCkptError as exc:
        report["second_save"] = type(exc).__name__
    report["latest"] = cloudckpt.latest_checkpoint(directory)
    report["ckpt2_index"] = cloudckpt.open_storage(directory).exists("ckpt-2.index")
