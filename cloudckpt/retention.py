"""Which checkpoints a manager keeps: small policy objects, combined (orbax-style).

``CheckpointManager(max_to_keep, keep_checkpoint_every_n_hours)`` maps onto
``LatestN`` + ``PreserveEveryNHours``; ``keep_best`` adds ``BestN``. The sweep itself is
TensorFlow's, exactly: while more than ``max_to_keep`` checkpoints are active, take the
oldest-inserted one; it is *preserved* (kept forever, leaves the active list) if it is at
least N hours newer than the last preserved one, otherwise it is deleted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class LatestN:
    """Keep at most ``n`` active checkpoints; ``None`` keeps every one."""

    n: int | None

    def __post_init__(self) -> None:
        if self.n is not None and self.n <= 0:
            raise ValueError(f"max_to_keep must be a positive integer or None, got {self.n}")


@dataclass(frozen=True, slots=True)
class PreserveEveryNHours:
    """Of the checkpoints ``LatestN`` evicts, keep one every ``hours`` hours for good."""

    hours: float

    def __post_init__(self) -> None:
        if self.hours <= 0:
            raise ValueError(f"keep_checkpoint_every_n_hours must be > 0, got {self.hours}")

    def preserves(self, timestamp: float, last_preserved: float) -> bool:
        return timestamp - self.hours * 3600.0 >= last_preserved


@dataclass(frozen=True, slots=True)
class BestN:
    """Also keep the ``n`` checkpoints with the best ``metric`` (from ``save(metadata=)``).

    Checkpoints without the metric never count as best. Beyond TensorFlow: lets a job keep
    its best-validation checkpoints while ``max_to_keep`` bounds the recent ones.
    """

    metric: str
    n: int
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"keep_best n must be > 0, got {self.n}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"keep_best mode must be 'min' or 'max', got {self.mode!r}")

    def best(self, metrics: Mapping[str, float]) -> set[str]:
        ranked = sorted(metrics, key=lambda name: metrics[name], reverse=self.mode == "max")
        return set(ranked[: self.n])


@dataclass(slots=True)
class SweepResult:
    """What one sweep decided. ``preserved`` leave the active list but stay on store."""

    deleted: list[str] = field(default_factory=list)
    preserved: dict[str, float] = field(default_factory=dict)
    last_preserved_timestamp: float = 0.0


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """The combination a manager applies after each save."""

    latest: LatestN
    preserve: PreserveEveryNHours | None = None
    best: BestN | None = None

    def sweep(self, active: OrderedDict[str, float], last_preserved_timestamp: float,
              metrics: Mapping[str, float] | None = None) -> SweepResult:
        """Evict from ``active`` (name -> timestamp, oldest inserted first) in place.

        Best-N checkpoints are skipped over, not evicted, and do not count toward
        ``max_to_keep`` (they are kept in addition to the latest N).
        """
        result = SweepResult(last_preserved_timestamp=last_preserved_timestamp)
        if self.latest.n is None:
            return result
        protected = self.best.best({k: v for k, v in (metrics or {}).items() if k in active}) if self.best else set()
        while sum(1 for name in active if name not in protected) > self.latest.n:
            name = next(name for name in active if name not in protected)
            timestamp = active.pop(name)
            if self.preserve is not None and self.preserve.preserves(timestamp, result.last_preserved_timestamp):
                result.last_preserved_timestamp = timestamp
                result.preserved[name] = timestamp
            else:
                result.deleted.append(name)
        return result
