"""The async save's staging buffer: reserved ahead of time, faulted in, reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloudckpt.object_graph import ArrayLeaf, Collected
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
