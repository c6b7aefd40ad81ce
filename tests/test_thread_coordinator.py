"""The in-process coordinator group (``cloudckpt.testing.threads``): collectives, bounded failures,
and the real multi-host save/restore path run by simulated hosts, one thread each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudckpt import UNSHARDED, CheckpointOptions, DTensorCheckpoint, Layout, Location, Mesh, ShardedArray
from cloudckpt.errors import CoordinationError, DistributedSaveError
from cloudckpt.format import index_key
from cloudckpt.storage import Storage, open_storage
from cloudckpt.testing.threads import RankOutcome, ThreadCoordinator, ThreadGroup

IO_HOST = CheckpointOptions(experimental_io_device="/job:worker/replica:0/task:0")


def values(outcomes: list[RankOutcome[Any]]) -> list[Any]:
    failed = [o for o in outcomes if not o.ok]
    assert not failed, "\n".join(o.traceback or repr(o.error) for o in failed)
    return [o.value for o in outcomes]


# ---------------------------------------------------------------------- collectives
def test_every_collective_gives_each_rank_its_part() -> None:
    group = ThreadGroup(5)

    def host(c: ThreadCoordinator) -> dict[str, Any]:
        c.barrier()
        return {
            "all": c.all_gather_object({"rank": c.rank}),
            "gather": c.gather_object(c.rank * 10, dst=2),
            "bcast": c.broadcast_object(f"from {c.rank}", src=3),
            "any_odd": c.any(c.rank == 4),
            "none": c.any(False),
        }

    out = values(group.run(host))
    for rank, got in enumerate(out):
        assert got["all"] == [{"rank": r} for r in range(5)]
        assert got["gather"] == ([0, 10, 20, 30, 40] if rank == 2 else None)
        assert got["bcast"] == "from 3"
        assert got["any_odd"] is True and got["none"] is False


def test_objects_travel_as_copies() -> None:
    """A rank mutating what it received cannot change another rank's copy (as with pickled collectives)."""
    group = ThreadGroup(3)

    def host(c: ThreadCoordinator) -> list[int]:
        got: list[int] = c.broadcast_object([1, 2, 3] if c.rank == 0 else None)
        got.append(c.rank)
        c.barrier()
        return got

    assert values(group.run(host)) == [[1, 2, 3, 0], [1, 2, 3, 1], [1, 2, 3, 2]]


def test_transfer_moves_bytes_to_the_destination_and_checks_sizes() -> None:
    group = ThreadGroup(4)

    def host(c: ThreadCoordinator) -> list[bytes]:
        mine = [np.full(3 + c.rank, c.rank, dtype=np.uint8), np.arange(2, dtype=np.uint8) + c.rank]
        incoming = {src: [np.zeros(3 + src, np.uint8), np.zeros(2, np.uint8)] for src in range(4) if src != 1}
        c.transfer(1, mine, incoming if c.rank == 1 else {})
        return [b.tobytes() for src in sorted(incoming) for b in incoming[src]] if c.rank == 1 else []

    got = values(group.run(host))[1]
    assert got == [bytes([0] * 3), bytes([0, 1]), bytes([2] * 5), bytes([2, 3]), bytes([3] * 6), bytes([3, 4])]

    bad = ThreadGroup(2)

    def wrong_size(c: ThreadCoordinator) -> None:
        c.transfer(0, [np.zeros(5, np.uint8)], {1: [np.zeros(4, np.uint8)]} if c.rank == 0 else {})

    outcomes = bad.run(wrong_size)
    assert all(isinstance(o.error, CoordinationError) and "expected [4]" in str(o.error) for o in outcomes)


def test_a_rank_that_never_comes_times_out_every_waiting_rank() -> None:
    group = ThreadGroup(3, timeout=0.5)

    def host(c: ThreadCoordinator) -> None:
        if c.rank != 2:
            c.barrier()

    outcomes = group.run(host, timeout=30)
    for o in outcomes[:2]:
        assert isinstance(o.error, CoordinationError) and "waiting for ranks [2]" in str(o.error)
    assert outcomes[2].ok
    with pytest.raises(CoordinationError, match="broken"):  # like a gloo group after a timeout
        group.coordinator(2).barrier()


def test_ranks_calling_different_collectives_fail_instead_of_mixing_them() -> None:
    group = ThreadGroup(3)

    def host(c: ThreadCoordinator) -> None:
        if c.rank == 1:
            c.barrier()
        else:
            c.all_gather_object(c.rank)

    for o in group.run(host):
        assert isinstance(o.error, CoordinationError)
        assert "barrier on ranks [1]" in str(o.error) and "all_gather_object on ranks [0, 2]" in str(o.error)


def test_a_rank_that_raises_aborts_the_others_at_once() -> None:
    group = ThreadGroup(4, timeout=600)  # no waiting out the timeout: the abort wakes them

    def host(c: ThreadCoordinator) -> int:
        if c.rank == 3:
            raise RuntimeError("this host crashed")
        c.barrier()
        return c.rank

    outcomes = group.run(host, timeout=60)
    assert isinstance(outcomes[3].error, RuntimeError)
    for o in outcomes[:3]:
        assert isinstance(o.error, CoordinationError) and "rank 3 raised RuntimeError" in str(o.error)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        ThreadGroup(0)
    with pytest.raises(ValueError):
        ThreadGroup(2, timeout=0)
    with pytest.raises(ValueError):
        ThreadGroup(2).coordinator(2)


# ---------------------------------------------------------------------- the real save/restore path
ROWS, COLS = 64, 24


def global_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"w": rng.standard_normal((ROWS, COLS)).astype(np.float32),
            "b": rng.integers(0, 1 << 30, size=(40,)).astype(np.int64),
            "table": rng.standard_normal((ROWS, 8)).astype(np.float64)}


def state_on(mesh: Mesh, arrays: dict[str, np.ndarray], specs: dict[str, list[str]]) -> dict[str, Any]:
    """This rank's state: sharded arrays by ``specs`` (only this rank's shards), the rest replicated."""
    out: dict[str, Any] = {}
    for name, array in arrays.items():
        if name in specs:
            out[name] = ShardedArray.from_global(array, Layout(specs[name], mesh))
        else:
            out[name] = array.copy()
    return out


def empty_like(state: dict[str, Any]) -> dict[str, Any]:
    return {name: ShardedArray(v.shape, v.dtype, v.layout) if isinstance(v, ShardedArray) else np.zeros_like(v)
            for name, v in state.items()}


def check_restored(mesh: Mesh, restored: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    for name, value in restored.items():
        if isinstance(value, ShardedArray):
            for box, shard in zip(value.local_boxes(), value.local_shards, strict=True):
                expected = arrays[name][tuple(slice(s, s + n) for s, n in zip(*box, strict=True))]
                assert shard.tobytes() == expected.tobytes(), (name, box)
        else:
            assert value.tobytes() == arrays[name].tobytes(), name


def own_storage(root: Path) -> Storage:
    """Each simulated host opens its own storage instance, as a separate process would."""
    return open_storage(str(root))


@pytest.mark.parametrize("world", [4, 8])
def test_simulated_hosts_save_and_restore_onto_another_layout_bit_exact(tmp_path: Path, world: int) -> None:
    arrays = global_arrays()
    save_specs = {"w": ["x", "y"], "table": ["x", UNSHARDED]}  # "b" replicated on every host
    restore_specs = {"w": [UNSHARDED, "m"], "b": ["m"], "table": ["m", UNSHARDED]}
    stores: list[Storage] = []

    def save(c: ThreadCoordinator) -> int:
        mesh = Mesh(["x", "y"], [world // 2, 2], coordinator=c)
        storage = own_storage(tmp_path)
        stores.append(storage)
        ckpt = DTensorCheckpoint(mesh, **state_on(mesh, arrays, save_specs))
        ckpt.write(Location(storage, "ckpt"))
        return len(mesh.local_devices())

    assert values(ThreadGroup(world).run(save)) == [1] * world
    assert len({id(s) for s in stores}) == world  # one storage instance per simulated host
    assert (tmp_path / index_key("ckpt")).exists()

    # Another layout and another mesh shape on the same number of hosts; each host reads its own ranges.
    def restore(c: ThreadCoordinator) -> None:
        mesh = Mesh(["m"], [world], coordinator=c)
        target = empty_like(state_on(mesh, arrays, restore_specs))
        DTensorCheckpoint(mesh, **target).read(Location(own_storage(tmp_path), "ckpt")).assert_consumed()
        check_restored(mesh, target, arrays)

    values(ThreadGroup(world).run(restore))

    # Half as many hosts, each holding two devices, restoring through the io host (every byte
    # travels by ``transfer`` from rank 0).
    def restore_via_io_host(c: ThreadCoordinator) -> None:
        mesh = Mesh(["m"], [world], coordinator=c)  # world devices over world // 2 processes
        target = empty_like(state_on(mesh, arrays, restore_specs))
        DTensorCheckpoint(mesh, **target).read(Location(own_storage(tmp_path), "ckpt"), options=IO_HOST)
        check_restored(mesh, target, arrays)

    values(ThreadGroup(world // 2).run(restore_via_io_host))


def test_io_host_save_sends_every_shard_by_transfer(tmp_path: Path) -> None:
    arrays = global_arrays()
    specs = {"w": ["x", UNSHARDED], "table": ["x", UNSHARDED]}
    touched: list[int] = []

    def save(c: ThreadCoordinator) -> None:
        mesh = Mesh(["x"], [4], coordinator=c)
        storage = own_storage(tmp_path)
        put = storage.put

        def counting_put(*args: Any, **kwargs: Any) -> Any:
            touched.append(c.rank)
            return put(*args, **kwargs)

        storage.put = counting_put  # type: ignore[method-assign]
        DTensorCheckpoint(mesh, **state_on(mesh, arrays, specs)).write(Location(storage, "io"), options=IO_HOST)

    values(ThreadGroup(4).run(save))
    assert set(touched) == {0}  # only the io host wrote

    def restore(c: ThreadCoordinator) -> None:
        mesh = Mesh(["x"], [4], coordinator=c)
        target = empty_like(state_on(mesh, arrays, {"w": [UNSHARDED, "x"], "table": ["x", UNSHARDED]}))
        DTensorCheckpoint(mesh, **target).read(Location(own_storage(tmp_path), "io")).assert_consumed()
        check_restored(mesh, target, arrays)

    values(ThreadGroup(4).run(restore))


def test_a_rank_whose_upload_fails_fails_every_ranks_save_naming_it(tmp_path: Path) -> None:
    arrays = global_arrays()
    specs = {"w": ["x", UNSHARDED], "table": ["x", UNSHARDED]}

    def save(c: ThreadCoordinator) -> DistributedSaveError:
        mesh = Mesh(["x"], [6], coordinator=c)
        storage = own_storage(tmp_path)
        if c.rank == 4:
            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise PermissionError(13, "injected: this host may not write")
            storage._put_whole = refuse  # type: ignore[method-assign]
        with pytest.raises(DistributedSaveError) as caught:
            DTensorCheckpoint(mesh, **state_on(mesh, arrays, specs)).write(Location(storage, "bad"))
        return caught.value

    errors = values(ThreadGroup(6, timeout=60).run(save, timeout=120))
    for error in errors:
        assert set(error.failures) == {4} and "may not write" in error.failures[4]
    assert not (tmp_path / index_key("bad")).exists()  # no half checkpoint is visible
    assert not list(tmp_path.glob("bad.data-*"))  # every rank removed what it had uploaded


def test_a_rank_that_raises_before_its_save_fails_every_rank_without_a_hang(tmp_path: Path) -> None:
    arrays = global_arrays()
    specs = {"w": ["x", UNSHARDED]}

    def save(c: ThreadCoordinator) -> DistributedSaveError:
        mesh = Mesh(["x"], [4], coordinator=c)
        state = state_on(mesh, arrays, specs)
        if c.rank == 2:
            raise RuntimeError("host 2 lost its GPU")
        with pytest.raises(DistributedSaveError) as caught:
            DTensorCheckpoint(mesh, **state).write(Location(own_storage(tmp_path), "lost"))
        return caught.value

    outcomes = ThreadGroup(4, timeout=600).run(save, timeout=120)  # the abort, not the timeout, ends it
    assert isinstance(outcomes[2].error, RuntimeError)
    for o in (outcomes[0], outcomes[1], outcomes[3]):
        assert o.ok, o.traceback
        assert isinstance(o.value, DistributedSaveError)
        assert "rank 2 raised RuntimeError: host 2 lost its GPU" in str(o.value)
    assert not (tmp_path / index_key("lost")).exists()
