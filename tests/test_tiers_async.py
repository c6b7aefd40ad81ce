"""The local tier's async saves and its automatic policy on one host (issue 28).

An async local save (``CheckpointOptions(enable_async=True)``) blocks the caller only for the
snapshot; the write, the replication and the manifest run in the background and are committed
when ``manager.sync()`` returns, which re-raises a background failure; a second save waits for
the first. ``LocalTier(every_n_steps=N, bucket_every_n_steps=M)`` makes ``manager.save()`` called
every step go local every N steps and to the bucket every M. The bucket is SeaweedFS
(``s3_root``); the local tier a directory under ``tmp_path``. The background part is held at
the replication step (``runner.replicate``) with an event, so what the tests see before
``sync()`` does not depend on timing.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cloudckpt
from cloudckpt import Checkpoint, CheckpointManager, CheckpointOptions, Variable
from cloudckpt.manager.tiers import LocalTier, list_local_tier
from cloudckpt.manager.tiers import runner as tier_runner

#: Bound on every wait of these tests (a broken build fails instead of hanging).
WAIT_S = 20.0


def values(step: int) -> np.ndarray:
    return np.arange(64, dtype=np.float32).reshape(8, 8) * step + 0.5


@pytest.fixture
def bucket(s3_root: str) -> str:
    return f"{s3_root}/{uuid.uuid4().hex[:8]}"


def committed(local: Path) -> list[int]:
    return sorted(s.number for s in list_local_tier(local) if s.status == "committed")


def manager_for(bucket: str, local: Path, w: Variable, *, asynchronous: bool = True, **policy: Any
                ) -> CheckpointManager:
    options = CheckpointOptions(enable_async=True) if asynchronous else None
    return CheckpointManager(Checkpoint(w=w), bucket, max_to_keep=3, options=options,
                             local_tier=LocalTier(local, replicas=1, max_to_keep=2, **policy))


def held_replication(monkeypatch: pytest.MonkeyPatch, gate: threading.Event, seen: list[str]
                     ) -> Callable[..., Any]:
    """Replace the tier's ``replicate`` with one that records the step and waits for ``gate``."""
    real = getattr(tier_runner, "replicate")  # noqa: B009 - the name the runner calls, replaced below

    def held(holdings: Any, coordinator: Any, name: str, holders: Any) -> Any:
        seen.append(f"replicate {name} on {threading.current_thread().name}")
        gate.wait(WAIT_S)
        return real(holdings, coordinator, name, holders)

    monkeypatch.setattr(tier_runner, "replicate", held)
    return held


def test_an_async_local_save_commits_in_the_background_when_sync_returns(
        bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local, w = tmp_path / "local", Variable(values(1))
    manager = manager_for(bucket, local, w)
    gate, seen = threading.Event(), list[str]()
    held_replication(monkeypatch, gate, seen)
    assert manager.save(checkpoint_number=1, tier="local") == f"{local}/ckpt-1"
    w.assign(values(99))  # the live state moves on: the snapshot was taken on the caller's thread
    assert committed(local) == []  # not committed while the background part is held
    gate.set()
    manager.sync()
    assert committed(local) == [1]
    assert seen and all("cloudckpt-local-save" in s for s in seen)  # replicated off the caller's thread
    resumed_w = Variable(np.zeros((8, 8), np.float32))
    resumed = manager_for(bucket, local, resumed_w)
    assert resumed.restore_or_initialize() == f"{local}/ckpt-1"
    np.testing.assert_array_equal(resumed_w.numpy(), values(1))


def test_a_second_save_waits_for_the_first(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local, w = tmp_path / "local", Variable(values(1))
    manager = manager_for(bucket, local, w)
    gate, seen = threading.Event(), list[str]()
    held_replication(monkeypatch, gate, seen)
    manager.save(checkpoint_number=1, tier="local")
    events: list[str] = []
    writer = type(manager.checkpoint)._write_managed

    def write(self: Checkpoint, path: Any, *args: Any, **kwargs: Any) -> str:
        events.append(f"write {path.name}, ckpt-1 committed: {1 in committed(local)}")
        return writer(self, path, *args, **kwargs)

    monkeypatch.setattr(type(manager.checkpoint), "_write_managed", write)
    releaser = threading.Timer(0.2, gate.set)  # the first save's background part is held until then
    releaser.start()
    try:
        w.assign(values(2))
        manager.save(checkpoint_number=2, tier="local")
        manager.sync()
    finally:
        releaser.cancel()
        gate.set()
    assert events == ["write ckpt-2, ckpt-1 committed: True"]
    assert committed(local) == [1, 2]


def test_a_background_failure_is_raised_by_sync_and_commits_nothing(
        bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local, w = tmp_path / "local", Variable(values(1))
    manager = manager_for(bucket, local, w)
    manager.save(checkpoint_number=1, tier="local")
    manager.sync()

    def broken(*args: Any) -> Any:
        raise OSError("replica disk full")

    monkeypatch.setattr(tier_runner, "replicate", broken)
    manager.save(checkpoint_number=2, tier="local")  # returns: the failure is in the background
    with pytest.raises(cloudckpt.SaveError, match="replica disk full"):
        manager.sync()
    manager.sync()  # raised once
    assert committed(local) == [1]
    manager.save(checkpoint_number=3, tier="local")  # ... and a later save's own check sees it too
    with pytest.raises(cloudckpt.SaveError, match="replica disk full"):
        manager.save(checkpoint_number=4, tier="local")
    monkeypatch.undo()
    manager.save(checkpoint_number=5, tier="local")
    manager.sync()
    assert committed(local) == [1, 5]


def test_the_automatic_policy_goes_local_every_n_steps_and_to_the_bucket_every_m(
        bucket: str, tmp_path: Path) -> None:
    local, w = tmp_path / "local", Variable(values(0))
    manager = manager_for(bucket, local, w, every_n_steps=2, bucket_every_n_steps=5)
    where: dict[int, str | None] = {}
    for step in range(1, 11):
        w.assign(values(step))
        where[step] = manager.save(checkpoint_number=step)
    manager.sync()
    assert where == {1: None, 2: f"{local}/ckpt-2", 3: None, 4: f"{local}/ckpt-4", 5: f"{bucket}/ckpt-5",
                     6: f"{local}/ckpt-6", 7: None, 8: f"{local}/ckpt-8", 9: None, 10: f"{bucket}/ckpt-10"}
    assert manager.checkpoints == [f"{bucket}/ckpt-5", f"{bucket}/ckpt-10"]
    assert committed(local) == [6, 8]  # the local tier's own max_to_keep=2
    assert cloudckpt.latest_checkpoint(bucket) == f"{bucket}/ckpt-10"
    # An explicit tier still wins over the policy.
    assert manager.save(checkpoint_number=11, tier="local") == f"{local}/ckpt-11"
    manager.sync()
    resumed_w = Variable(np.zeros((8, 8), np.float32))
    assert manager_for(bucket, local, resumed_w).restore_or_initialize() == f"{local}/ckpt-11"
    np.testing.assert_array_equal(resumed_w.numpy(), values(10))


def test_the_policy_counts_the_step_counter_or_the_calls(bucket: str, tmp_path: Path) -> None:
    step = Variable(0)
    with_counter = CheckpointManager(
        Checkpoint(w=Variable(np.zeros(3)), step=step), f"{bucket}/a", max_to_keep=2, step_counter=step,
        local_tier=LocalTier(tmp_path / "a", every_n_steps=3))
    saved = []
    for s in range(1, 7):
        step.assign(s)
        saved.append(with_counter.save() is not None)
    assert saved == [False, False, True, False, False, True]
    assert committed(tmp_path / "a") == [1, 2]  # named by save_counter: the 1st and 2nd saves
    counted = CheckpointManager(Checkpoint(w=Variable(np.zeros(3))), f"{bucket}/b", max_to_keep=2,
                                local_tier=LocalTier(tmp_path / "b", bucket_every_n_steps=2))
    assert [counted.save() for _ in range(4)] == [None, f"{bucket}/b/ckpt-1", None, f"{bucket}/b/ckpt-2"]
    plain = CheckpointManager(Checkpoint(w=Variable(np.zeros(3))), f"{bucket}/c", max_to_keep=2,
                              local_tier=LocalTier(tmp_path / "c"))
    assert plain.save() == f"{bucket}/c/ckpt-1"  # no policy: the bucket, as without a local tier
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            LocalTier(tmp_path / "d", every_n_steps=bad)  # type: ignore[arg-type]


def test_a_forced_save_goes_to_the_bucket_whatever_the_policy(bucket: str, tmp_path: Path) -> None:
    """``check_interval=False`` (what a preemption's final save passes) is never skipped by the policy."""
    manager = CheckpointManager(Checkpoint(w=Variable(np.zeros(3))), bucket, max_to_keep=2,
                                local_tier=LocalTier(tmp_path / "local", every_n_steps=2, bucket_every_n_steps=4))
    assert manager.save(checkpoint_number=3, check_interval=False) == f"{bucket}/ckpt-3"
    assert manager.save(checkpoint_number=3) is None
