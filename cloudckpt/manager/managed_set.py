"""The set of checkpoints a manager keeps, and how it is written down.

One value type holds what TensorFlow's ``CheckpointManager`` tracks (the active
checkpoints with their timestamps, the last preserved timestamp) plus cloudckpt's own
bookkeeping (preserved-forever checkpoints, keep-best metrics, evictions whose deletion may
not have finished). It has exactly two external forms: the state file
(``to_state`` / ``adopt``, TensorFlow's text format) and itself, broadcast to the other
ranks of a multi-host job (a plain dataclass of strings and floats).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from cloudckpt.format.state_file import CheckpointState
from cloudckpt.manager.directory import relative_name
from cloudckpt.manager.retention import CheckpointRecord, RetentionPolicy, metric_key, sweep

log = logging.getLogger("cloudckpt.manager")

_NUMBER = re.compile(r"-(-?[0-9]+)\Z")


@dataclass(slots=True)
class ManagedSet:
    """What a manager keeps. Names are relative to the directory.

    Attributes:
        active: checkpoint name -> save timestamp, oldest inserted first (``max_to_keep`` applies).
        preserved: kept for good by the retention policy (``keep_checkpoint_every_n_hours``);
            they left the active list.
        metrics: per active checkpoint, the value of the metric the policy reads (``BestN``).
        latest: the newest checkpoint recorded (``model_checkpoint_path``).
        last_preserved: TensorFlow's ``last_preserved_timestamp``.
        deleting: evicted checkpoints whose deletion may not have finished.
    """

    active: OrderedDict[str, float] = field(default_factory=OrderedDict)
    preserved: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    latest: str | None = None
    last_preserved: float = 0.0
    deleting: list[str] = field(default_factory=list)

    @classmethod
    def fresh(cls, now: float) -> ManagedSet:
        """Nothing managed yet (TensorFlow starts ``last_preserved_timestamp`` just before now)."""
        return cls(last_preserved=now - 1.0)

    @classmethod
    def adopt(cls, state: CheckpointState | None, directory: str, now: float) -> ManagedSet:
        """TensorFlow's recovery rules: which checkpoints a state file's list makes active again.

        Only checkpoints newer than the last preserved timestamp become active (older ones
        were kept by an earlier manager's preservation and are never deleted).
        """
        if state is None:
            return cls.fresh(now)
        latest = relative_name(state.model_checkpoint_path, directory) if state.model_checkpoint_path else None
        last = state.last_preserved_timestamp if state.last_preserved_timestamp is not None else now - 1.0
        if now < last:
            log.warning("time.time() is %.1f seconds behind the last preserved checkpoint's timestamp; "
                        "clamping it to now (did the clock go backwards?)", last - now)
            last = now
        paths = [relative_name(p, directory) for p in state.all_model_checkpoint_paths]
        stamps = state.all_model_checkpoint_timestamps or [last] * len(paths)
        active: OrderedDict[str, float] = OrderedDict()
        for name, stamp in zip(paths, stamps, strict=True):
            stamp = min(stamp, now)
            if stamp > last:
                active[name] = stamp
        preserved = dict(state.preserved)
        kept = {*active, *preserved, latest}
        deleting = [name for name in (relative_name(p, directory) for p in state.deleting) if name not in kept]
        return cls(active=active, preserved=preserved, metrics={k: v for k, v in state.metrics.items() if k in active},
                   latest=latest, last_preserved=last, deleting=deleting)

    def to_state(self, writer: str) -> CheckpointState:
        """The state file that records this set, owned by ``writer``."""
        return CheckpointState(
            model_checkpoint_path=self.latest,
            all_model_checkpoint_paths=list(self.active),
            all_model_checkpoint_timestamps=list(self.active.values()),
            last_preserved_timestamp=self.last_preserved,
            writer=writer,
            preserved=dict(self.preserved),
            metrics=dict(self.metrics),
            deleting=list(self.deleting),
        )

    def copy(self) -> ManagedSet:
        return ManagedSet(OrderedDict(self.active), dict(self.preserved), dict(self.metrics), self.latest,
                          self.last_preserved, list(self.deleting))

    def record(self, name: str, timestamp: float, metric: float | None, policy: RetentionPolicy) -> list[str]:
        """Add a just-committed checkpoint and apply ``policy``; return the newly evicted names.

        ``metric`` is the save's value of the one metadata key ``policy`` reads (the state file
        keeps one metric per checkpoint). Evicted names are added to ``deleting`` in the same
        state write that drops them, so a deletion cut short by a crash is finished by the next
        save or owner.
        """
        self.active.pop(name, None)
        self.active[name] = timestamp
        self.preserved.pop(name, None)
        if name in self.deleting:  # re-saved before its old version was deleted: keep it
            self.deleting.remove(name)
        if metric is not None:
            self.metrics[name] = metric
        self.latest = name
        swept = sweep(policy, self.records(policy), self.last_preserved)
        self.last_preserved = swept.last_preserved
        self.preserved.update((gone, self.active[gone]) for gone in swept.preserved)
        for dropped in (*swept.preserved, *swept.deleted):
            del self.active[dropped]
            self.metrics.pop(dropped, None)
        evicted = [gone for gone in swept.deleted if gone not in self.deleting]
        self.deleting.extend(evicted)
        return evicted

    def records(self, policy: RetentionPolicy) -> list[CheckpointRecord]:
        """The active checkpoints as ``policy`` sees them, oldest saved first."""
        key = metric_key(policy)
        return [CheckpointRecord(name, _number(name), stamp,
                                 {key: self.metrics[name]} if key is not None and name in self.metrics else {})
                for name, stamp in self.active.items()]

    def forget(self, damaged: Collection[str], restored: str) -> None:
        """Stop managing ``damaged`` checkpoints a resume skipped; ``restored`` becomes the latest.

        So retention keeps the one restored, and the next incremental save's base is it - never
        a checkpoint known to be damaged, whose bytes a deterministic step recreates exactly.
        """
        for name in damaged:
            self.active.pop(name, None)
            self.metrics.pop(name, None)
        self.latest = restored

    def newest_first(self) -> list[str]:
        """Candidates for "latest": the recorded latest, then the active list newest first."""
        names = list(reversed(self.active))
        if self.latest and self.latest not in names:
            names.insert(0, self.latest)
        return names


def _number(name: str) -> int | None:
    """The number a checkpoint name ends in (``ckpt-7`` -> 7), ``None`` without one."""
    found = _NUMBER.search(name)
    return int(found.group(1)) if found else None
