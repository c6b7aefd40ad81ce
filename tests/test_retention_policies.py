"""Retention as combinable policies (issue 23): each policy alone, combined, and TensorFlow's mapping."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudckpt import Checkpoint, Variable
from cloudckpt.format.index_fetch import load_index
from cloudckpt.manager import CheckpointManager
from cloudckpt.manager.managed_set import ManagedSet
from cloudckpt.manager.retention import (
    AnyOf,
    BestN,
    CheckpointRecord,
    EveryNHours,
    Kept,
    LatestN,
    RetentionContext,
    manager_policy,
    metric_key,
    sweep,
)
from cloudckpt.storage import open_storage

HOUR = 3600.0
START = RetentionContext(last_preserved=0.0)


def _records(*stamps: float, metric: Sequence[float | None] = ()) -> list[CheckpointRecord]:
    values = list(metric) + [None] * (len(stamps) - len(metric))
    return [CheckpointRecord(f"ckpt-{i + 1}", i + 1, stamp, {} if value is None else {"loss": value})
            for i, (stamp, value) in enumerate(zip(stamps, values, strict=True))]


def _names(names: frozenset[str] | Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))


# ---------------------------------------------------------------- each policy alone
def test_latest_n_keeps_the_newest_for_now() -> None:
    records = _records(1, 2, 3, 4)
    assert LatestN(2).keep(records, START) == Kept(for_now=frozenset({"ckpt-3", "ckpt-4"}))
    assert _names(LatestN(None).keep(records, START).for_now) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert _names(LatestN(9).keep(records, START).for_now) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_to_keep"):
            LatestN(bad)


def test_every_n_hours_walks_from_the_last_preserved_mark() -> None:
    records = _records(1 * HOUR, 1.5 * HOUR, 2.5 * HOUR, 3 * HOUR, 3.5 * HOUR)
    kept = EveryNHours(1).keep(records, RetentionContext(last_preserved=0.0))
    assert kept.for_now == frozenset() and _names(kept.for_good) == ["ckpt-1", "ckpt-3", "ckpt-5"]
    later = EveryNHours(1).keep(records, RetentionContext(last_preserved=1.2 * HOUR))
    assert _names(later.for_good) == ["ckpt-3", "ckpt-5"]
    for bad in (0, -2.0):
        with pytest.raises(ValueError, match="keep_checkpoint_every_n_hours"):
            EveryNHours(bad)


def test_every_n_hours_alone_preserves_and_deletes_the_rest() -> None:
    done = sweep(EveryNHours(1), _records(1 * HOUR, 1.5 * HOUR, 2.5 * HOUR, 2.6 * HOUR), last_preserved=0.0)
    assert done.preserved == ("ckpt-1", "ckpt-3") and done.last_preserved == 2.5 * HOUR
    assert done.deleted == ("ckpt-2",) and done.active == ("ckpt-4",)  # the one just saved always stays


def test_best_n_ranks_by_the_metric_min_and_max() -> None:
    records = _records(1, 2, 3, 4, metric=[0.5, 0.1, 0.9, 0.1])
    assert _names(BestN("loss", 2).keep(records, START).for_now) == ["ckpt-2", "ckpt-4"]
    assert _names(BestN("loss", 1).keep(records, START).for_now) == ["ckpt-2"]  # a tie goes to the older
    assert _names(BestN("loss", 2, mode="max").keep(records, START).for_now) == ["ckpt-1", "ckpt-3"]
    assert BestN("loss", 1).metric_keys() == frozenset({"loss"})
    with pytest.raises(ValueError, match="n must be > 0"):
        BestN("loss", 0)
    with pytest.raises(ValueError, match="mode"):
        BestN("loss", 1, mode="best")  # type: ignore[arg-type]


def test_best_n_with_missing_metrics() -> None:
    """A checkpoint saved without the metric never counts as best, even when fewer than n have it."""
    records = _records(1, 2, 3, 4, metric=[None, 0.3, None, None])
    assert BestN("loss", 2).keep(records, START).for_now == frozenset({"ckpt-2"})
    assert BestN("loss", 2).keep(_records(1, 2), START).for_now == frozenset()
    # BestN alone: one without the metric is kept only while it is the newest.
    done = sweep(BestN("loss", 2), records, last_preserved=0.0)
    assert done.active == ("ckpt-2", "ckpt-4") and done.deleted == ("ckpt-1", "ckpt-3")


# ---------------------------------------------------------------- combinations
def test_any_of_keeps_what_any_policy_keeps() -> None:
    records = _records(1 * HOUR, 1.5 * HOUR, 2.5 * HOUR, 3 * HOUR, 3.2 * HOUR, metric=[0.9, 0.1, 0.5, 0.7, 0.8])
    policy = AnyOf([LatestN(2), EveryNHours(2), BestN("loss", 1)])
    kept = policy.keep(records, START)
    assert _names(kept.for_now) == ["ckpt-2", "ckpt-4", "ckpt-5"]
    assert _names(kept.for_good) == ["ckpt-3"]
    assert policy.metric_keys() == frozenset({"loss"})
    assert policy == AnyOf((LatestN(2), EveryNHours(2), BestN("loss", 1)))  # a value, list or tuple
    with pytest.raises(ValueError, match="at least one"):
        AnyOf([])


def test_best_and_latest_keep_what_either_keeps() -> None:
    """Any-of: the best checkpoint is kept besides the latest N, and counts among them when it is one."""
    policy = AnyOf((LatestN(2), BestN("loss", 1)))
    best_is_old = sweep(policy, _records(1, 2, 3, 4, metric=[0.1, 0.5, 0.6, 0.7]), 0.0)
    assert best_is_old.active == ("ckpt-1", "ckpt-3", "ckpt-4") and best_is_old.deleted == ("ckpt-2",)
    best_is_new = sweep(policy, _records(1, 2, 3, 4, metric=[0.9, 0.5, 0.6, 0.1]), 0.0)
    assert best_is_new.active == ("ckpt-3", "ckpt-4") and best_is_new.deleted == ("ckpt-1", "ckpt-2")


def test_preserved_leave_oldest_first_so_every_n_hours_decides_the_same_next_time() -> None:
    """ckpt-1 is kept for good by EveryNHours and for now by BestN; when the later ckpt-3 is
    preserved, ckpt-1 leaves with it: the mark moves past it, and it must not be re-decided."""
    policy = AnyOf((LatestN(1), EveryNHours(1), BestN("loss", 1)))
    records = _records(1 * HOUR, 1.5 * HOUR, 2.5 * HOUR, 2.7 * HOUR, metric=[0.1, 0.5, 0.6, 0.7])
    done = sweep(policy, records, last_preserved=0.0)
    assert done.preserved == ("ckpt-1", "ckpt-3") and done.last_preserved == 2.5 * HOUR
    assert done.deleted == ("ckpt-2",) and done.active == ("ckpt-4",)
    # While nothing later is preserved, a checkpoint some policy keeps for now stays active.
    early = sweep(policy, records[:2], last_preserved=0.0)
    assert early.active == ("ckpt-1", "ckpt-2") and early.preserved == () and early.last_preserved == 0.0


# ---------------------------------------------------------------- the manager's arguments
def test_manager_policy_maps_tensorflows_arguments() -> None:
    assert manager_policy(3, None) == LatestN(3)
    assert manager_policy(3, 0) == LatestN(3)  # TensorFlow: a falsy keep_checkpoint_every_n_hours is off
    assert manager_policy(None, 2.0) == AnyOf((LatestN(None), EveryNHours(2.0)))
    best = BestN("loss", 2)
    assert manager_policy(3, 6, keep_best=best) == AnyOf((LatestN(3), EveryNHours(6), best))
    custom = AnyOf((LatestN(2), BestN("acc", 1, mode="max")))
    assert manager_policy(None, None, preservation=custom) is custom
    assert metric_key(custom) == "acc" and metric_key(LatestN(1)) is None
    for clash in ({"max_to_keep": 3}, {"keep_checkpoint_every_n_hours": 1.0}, {"keep_best": best}):
        arguments = {"max_to_keep": None, "keep_checkpoint_every_n_hours": None, **clash}
        with pytest.raises(ValueError, match="preservation= replaces"):
            manager_policy(**arguments, preservation=custom)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one metric"):
        manager_policy(None, None, preservation=AnyOf((BestN("loss", 1), BestN("acc", 1))))


def _tensorflow_record(active: OrderedDict[str, float], preserved: dict[str, float], last: float, name: str,
                       stamp: float, max_to_keep: int | None, hours: float | None) -> tuple[float, list[str]]:
    """The three-slot struct the policies replaced (``RetentionPolicy.sweep``, keep_best unset), which
    is ``tf.train.CheckpointManager._sweep``: the oracle. Returns the new mark and the deleted names."""
    active.pop(name, None)
    active[name] = stamp
    preserved.pop(name, None)
    deleted: list[str] = []
    if max_to_keep is None:
        return last, deleted
    while len(active) > max_to_keep:
        oldest = next(iter(active))
        timestamp = active.pop(oldest)
        if hours and timestamp - hours * 3600.0 >= last:
            last = timestamp
            preserved[oldest] = timestamp
        else:
            deleted.append(oldest)
    return last, deleted


_saves = st.lists(st.tuples(st.integers(1, 8),  # checkpoint number: repeats re-save a name
                            st.floats(-600.0, 3 * HOUR, allow_nan=False)),  # clock step (it may go back)
                  min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(saves=_saves, max_to_keep=st.one_of(st.none(), st.integers(1, 5)),
       hours=st.sampled_from([None, 0, 0.25, 0.5, 1.0, 1.5, 2.0]), start=st.floats(0.0, 2 * HOUR))
def test_tensorflow_arguments_decide_as_the_old_struct(saves: list[tuple[int, float]], max_to_keep: int | None,
                                                        hours: float | None, start: float) -> None:
    """Over random histories (re-saves, a clock that steps back), max_to_keep and
    keep_checkpoint_every_n_hours keep, preserve and delete exactly what they did before."""
    policy = manager_policy(max_to_keep, hours)
    managed = ManagedSet.fresh(start)
    active: OrderedDict[str, float] = OrderedDict()
    preserved: dict[str, float] = {}
    last, now = managed.last_preserved, start
    for number, step in saves:
        now += step
        name = f"ckpt-{number}"
        last, deleted = _tensorflow_record(active, preserved, last, name, now, max_to_keep, hours)
        evicted = managed.record(name, now, None, policy)
        assert list(managed.active.items()) == list(active.items())
        assert managed.preserved == preserved and managed.last_preserved == last
        assert evicted == [gone for gone in deleted if gone != name]
        managed.deleting.clear()  # as if every eviction's deletion finished


# ---------------------------------------------------------------- through CheckpointManager
@pytest.fixture
def clock() -> object:
    class Clock:
        now = 10_000.0

        def __call__(self) -> float:
            return self.now

    fake = Clock()
    with mock.patch("cloudckpt.manager.manager.time.time", fake):
        yield fake


def _kept(manager: CheckpointManager) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in manager.checkpoints]


def test_manager_takes_a_policy_and_reads_the_metric_from_save_metadata(tmp_path: Path, clock: object) -> None:
    policy = AnyOf((LatestN(1), BestN("accuracy", 2, mode="max")))
    manager = CheckpointManager(Checkpoint(v=Variable(1.0)), tmp_path, max_to_keep=None, preservation=policy)
    for accuracy in (0.5, 0.8, None, 0.6, 0.7):
        clock.now += 1  # type: ignore[attr-defined]
        manager.save(metadata=None if accuracy is None else {"accuracy": accuracy, "step": 3})
    assert _kept(manager) == ["ckpt-2", "ckpt-5"]  # the two most accurate, and the newest (also second best)
    storage = open_storage(tmp_path)
    assert [n for n in ("ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5") if storage.exists(f"{n}.index")] \
        == ["ckpt-2", "ckpt-5"]
    resumed = CheckpointManager(Checkpoint(v=Variable(0.0)), tmp_path, max_to_keep=None, preservation=policy)
    assert resumed.restore_or_initialize() == str(tmp_path / "ckpt-5")
    clock.now += 1  # type: ignore[attr-defined]
    resumed.save()  # no metric: the metrics recorded in the state file still rank ckpt-2 and ckpt-5
    assert _kept(resumed) == ["ckpt-2", "ckpt-5", "ckpt-6"]


def test_manager_refuses_a_policy_beside_tensorflows_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preservation= replaces"):
        CheckpointManager(Checkpoint(), tmp_path, max_to_keep=3, preservation=LatestN(2))


def test_eviction_stays_reference_aware_whatever_the_policy_keeps(tmp_path: Path, clock: object) -> None:
    """BestN keeps ckpt-1 and the newest; the evicted middle ones are gone, but the bytes of the
    unchanged array that the kept checkpoints name (in ckpt-1's object) stay, and restore."""
    frozen = np.arange(50_000, dtype=np.float32)
    step = Variable(0)
    ckpt = Checkpoint(frozen=frozen, step=step)
    manager = CheckpointManager(ckpt, tmp_path, max_to_keep=None, preservation=BestN("loss", 1))
    for loss in (0.1, 0.5, 0.4, 0.3):
        clock.now += 1  # type: ignore[attr-defined]
        step.assign_add(1)
        manager.save(metadata={"loss": loss})
    assert _kept(manager) == ["ckpt-1", "ckpt-4"]
    storage = open_storage(tmp_path)
    named = {o.name for n in ("ckpt-1", "ckpt-4") for o in load_index(storage, n).objects}
    left = {m.key for m in storage.list("") if ".data-" in m.key}
    assert left == named and not [k for k in left if k.startswith(("ckpt-2.", "ckpt-3."))]
    target = np.zeros_like(frozen)
    Checkpoint(frozen=target, step=Variable(0)).restore(str(tmp_path / "ckpt-4")).assert_consumed()
    np.testing.assert_array_equal(target, frozen)
