"""The async save's staging buffer: reserved ahead of time, faulted in, reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloudckpt.object_graph import ArrayLeaf, Collected, ShardedLeaf
from cloudckpt.saving import async_save
from cloudckpt.saving.async_save import StagingBuffer

MiB = 1024 * 1024


def entries() -> dict[str, Collected]:
    rng = np.random.default_rng(1)
    return {"a": ArrayLeaf(rng.standard_normal((256, 1024)).astype(np.float32), "ndarray"),  # 1 MiB
            "b": ArrayLeaf(np.arange(10, dtype=np.int64), "ndarray"),
            "c": ArrayLeaf(rng.standard_normal(3 * MiB // 8), "ndarray")}  # 3 MiB


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_reserve_faults_the_memory_in_now() -> None:
    staging = StagingBuffer()
    before = resident_bytes()
    staging.reserve(64 * MiB)
    assert staging.capacity == 64 * MiB
    assert resident_bytes() - before >= 60 * MiB  # mapped now, not during the first save's copy


def test_without_populate_advice_the_pages_are_touched_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before 5.14 refuses ``MADV_POPULATE_WRITE`` (EINVAL): still mapped now, and writable."""
    monkeypatch.setattr(async_save, "_MADV_POPULATE_WRITE", 0x7FFF)  # advice no kernel knows
    before = resident_bytes()
    buffer = async_save._prefaulted(64 * MiB)
    assert resident_bytes() - before >= 60 * MiB
    buffer[-1] = 7
    assert buffer.nbytes == 64 * MiB and buffer[-1] == 7 and async_save._prefaulted(0).nbytes == 0


def test_stage_after_reserve_for_copies_into_the_reserved_buffer() -> None:
    staging = StagingBuffer()
    live = entries()
    used = staging.reserve_for(live, budget=1 << 40)
    buffer = staging._buffer
    assert used >= sum(int(item.array.nbytes) for item in live.values() if isinstance(item, ArrayLeaf))
    staged, overflow, nbytes = staging.stage(live, budget=1 << 40)
    assert staging._buffer is buffer and overflow == set()
    assert nbytes == sum(int(item.array.nbytes) for item in live.values() if isinstance(item, ArrayLeaf))
    for path, item in live.items():
        copy = staged[path]
        assert isinstance(item, ArrayLeaf) and isinstance(copy, ArrayLeaf)
        assert np.shares_memory(copy.array, buffer) and not np.shares_memory(copy.array, item.array)
        np.testing.assert_array_equal(copy.array, item.array)


def test_reserve_never_shrinks_and_a_budget_bounds_it() -> None:
    staging = StagingBuffer()
    staging.reserve(8 * MiB)
    buffer = staging._buffer
    staging.reserve(MiB)
    assert staging._buffer is buffer and staging.capacity == 8 * MiB
    assert StagingBuffer().reserve_for(entries(), budget=2 * MiB) < 2 * MiB  # "c" would not fit: not reserved


def test_a_manager_with_async_options_reserves_the_staging_buffer_at_construction(tmp_path: Path) -> None:
    from cloudckpt import Checkpoint, CheckpointManager, CheckpointOptions

    ckpt = Checkpoint(w=np.ones(2 * MiB // 8))
    CheckpointManager(ckpt, tmp_path, max_to_keep=1)
    assert ckpt._saver is None  # sync options: nothing reserved, nothing started
    manager = CheckpointManager(ckpt, tmp_path, max_to_keep=1, options=CheckpointOptions(enable_async=True))
    assert ckpt._saver is not None and ckpt._saver.staging.capacity >= 2 * MiB
    buffer = ckpt._saver.staging._buffer
    manager.save()
    manager.sync()
    assert ckpt._saver.staging._buffer is buffer  # the first save copied into the reserved buffer


def test_frozen_leaves_are_neither_copied_nor_counted_and_the_rest_still_is() -> None:
    """A leaf whose bytes can never change (a CPU jax.Array's view) is uploaded from where it is."""
    staging = StagingBuffer()
    live = entries()
    frozen = np.arange(4096, dtype=np.float32)
    live["frozen"] = ArrayLeaf(frozen, "ndarray", frozen=True)
    live["sharded"] = ShardedLeaf((8192,), np.dtype(np.float32), "ndarray", (((0,), frozen), ((4096,), frozen)),
                                  frozen=True)
    plain = sum(int(item.array.nbytes) for path, item in live.items() if path in ("a", "b", "c"))
    used = staging.reserve_for(live, budget=1 << 40)
    assert used == StagingBuffer().reserve_for(entries(), budget=1 << 40)  # no room taken by the frozen ones
    staged, overflow, nbytes = staging.stage(live, budget=used)  # exactly the plain leaves fit
    assert overflow == set() and nbytes == plain
    assert staged["frozen"] is live["frozen"] and staged["sharded"] is live["sharded"]
    for path in ("a", "b", "c"):
        copy, source = staged[path], live[path]
        assert isinstance(copy, ArrayLeaf) and isinstance(source, ArrayLeaf)
        assert not np.shares_memory(copy.array, source.array)


def test_an_async_save_stages_numpy_arrays_but_not_immutable_bytes(tmp_path: Path) -> None:
    from cloudckpt import Checkpoint, CheckpointOptions

    blob, array = bytes(range(256)) * 4096, np.arange(1000, dtype=np.int64)
    ckpt = Checkpoint(state={"blob": blob, "array": array})
    path = ckpt.save(str(tmp_path / "ck"), options=CheckpointOptions(enable_async=True))
    ckpt.sync()
    stats = ckpt.last_save_stats
    assert stats is not None and array.nbytes <= stats.staged_bytes <= array.nbytes + 8  # + save_counter
    restored = Checkpoint(state={"blob": b"", "array": np.zeros(1000, np.int64)})
    restored.restore(path).assert_consumed()
    assert restored.state["blob"] == blob and np.array_equal(restored.state["array"], array)
