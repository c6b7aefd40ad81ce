"""Which checkpoints a manager keeps: small policy objects, combined by "any of" (orbax's model).

A policy looks at the manager's active checkpoints (``CheckpointRecord``, oldest saved first)
and answers which it keeps (``Kept``): *for now* - decided again at every save - or *for good*:
TensorFlow's preserved checkpoints, which leave the active list and are never deleted by the
manager. ``AnyOf`` keeps what any of its policies keeps. ``sweep`` turns a policy's answer into
the manager's decision: which stay active, which are preserved, which are deleted. The
checkpoint just saved is always kept, whatever the policy says: it is the one a resume picks.

``CheckpointManager(max_to_keep=n, keep_checkpoint_every_n_hours=h)`` is
``AnyOf((LatestN(n), EveryNHours(h)))`` (``manager_policy``), and that is TensorFlow's sweep
exactly: TensorFlow pops the oldest active checkpoint while more than ``n`` are active and
preserves it if it is at least ``h`` hours newer than the last preserved one. Those popped are
the ones ``LatestN`` does not keep; ``EveryNHours`` walks the active list in the same order from
the same anchor (``last_preserved``), so it preserves the same ones.

Deciding is all a policy does: deleting stays reference-aware whatever it picks (the data
objects an index still names are kept; ``manager.directory.delete_checkpoint``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """One managed checkpoint, as policies see it.

    Attributes:
        name: the checkpoint's name in its directory (``ckpt-7``).
        number: its number (``7``), or ``None`` when the name carries none.
        timestamp: when it was saved (``time.time()``; TensorFlow's checkpoint timestamp).
        metadata: the numbers of its ``save(metadata=...)`` that the policy reads (``metric_keys``);
            a key is missing when the save did not pass it.
    """

    name: str
    number: int | None
    timestamp: float
    metadata: Mapping[str, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class RetentionContext:
    """What a policy may know beyond the records: TensorFlow's ``last_preserved_timestamp``."""

    last_preserved: float


@dataclass(frozen=True, slots=True)
class Kept:
    """A policy's answer, as checkpoint names.

    Attributes:
        for_now: kept at this save; the next save decides again.
        for_good: preserved - kept by the manager forever once nothing keeps them for now.
    """

    for_now: frozenset[str] = frozenset()
    for_good: frozenset[str] = frozenset()

    def __or__(self, other: Kept) -> Kept:
        return Kept(self.for_now | other.for_now, self.for_good | other.for_good)


class RetentionPolicy(Protocol):
    """Decides which of a manager's active checkpoints it keeps (orbax's ``PreservationPolicy``)."""

    def keep(self, records: Sequence[CheckpointRecord], context: RetentionContext) -> Kept:
        """The records kept, of ``records`` (the active checkpoints, oldest saved first)."""
        ...

    def metric_keys(self) -> frozenset[str]:
        """The ``save(metadata=...)`` keys this policy reads (the manager records their values)."""
        ...


@dataclass(frozen=True, slots=True)
class LatestN:
    """Keep the ``n`` newest checkpoints for now; ``None`` keeps every one (``max_to_keep``)."""

    n: int | None

    def __post_init__(self) -> None:
        if self.n is not None and (not isinstance(self.n, int) or self.n <= 0):
            raise ValueError(f"max_to_keep must be a positive integer or None, got {self.n!r}")

    def keep(self, records: Sequence[CheckpointRecord], context: RetentionContext) -> Kept:
        chosen = records if self.n is None else records[-self.n:]
        return Kept(for_now=frozenset(r.name for r in chosen))

    def metric_keys(self) -> frozenset[str]:
        return frozenset()


@dataclass(frozen=True, slots=True)
class EveryNHours:
    """Preserve one checkpoint every ``hours`` hours, for good (``keep_checkpoint_every_n_hours``).

    Walks the records oldest first from the last preserved timestamp: a checkpoint at least
    ``hours`` newer than the last one preserved is preserved and becomes the new mark.
    """

    hours: float

    def __post_init__(self) -> None:
        if not self.hours > 0:
            raise ValueError(f"keep_checkpoint_every_n_hours must be > 0, got {self.hours}")

    def keep(self, records: Sequence[CheckpointRecord], context: RetentionContext) -> Kept:
        mark, chosen = context.last_preserved, set()
        for record in records:
            if record.timestamp - self.hours * 3600.0 >= mark:  # TensorFlow's expression, to the bit
                mark = record.timestamp
                chosen.add(record.name)
        return Kept(for_good=frozenset(chosen))

    def metric_keys(self) -> frozenset[str]:
        return frozenset()


@dataclass(frozen=True, slots=True)
class BestN:
    """Keep, for now, the ``n`` checkpoints with the best ``metric`` (from ``save(metadata=)``).

    ``mode="min"`` ranks lower as better (a loss), ``"max"`` higher (an accuracy); ties go to
    the older checkpoint. A checkpoint saved without the metric never counts as best: the other
    policies decide about it (with ``BestN`` alone it is kept only while it is the newest).
    Beyond TensorFlow: lets a job keep its best-validation checkpoints beside the recent ones.
    """

    metric: str
    n: int
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n <= 0:
            raise ValueError(f"keep_best n must be > 0, got {self.n!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"keep_best mode must be 'min' or 'max', got {self.mode!r}")

    def keep(self, records: Sequence[CheckpointRecord], context: RetentionContext) -> Kept:
        scored = [r for r in records if self.metric in r.metadata]
        sign = -1.0 if self.mode == "max" else 1.0
        ranked = sorted(scored, key=lambda r: sign * r.metadata[self.metric])  # stable: older wins ties
        return Kept(for_now=frozenset(r.name for r in ranked[: self.n]))

    def metric_keys(self) -> frozenset[str]:
        return frozenset((self.metric,))


@dataclass(frozen=True, slots=True, init=False)
class AnyOf:
    """Keep a checkpoint if any of ``policies`` keeps it (orbax's ``AnyPreservationPolicy``)."""

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, policies: Iterable[RetentionPolicy]) -> None:
        chosen = tuple(policies)
        if not chosen:
            raise ValueError("AnyOf needs at least one policy")
        object.__setattr__(self, "policies", chosen)

    def keep(self, records: Sequence[CheckpointRecord], context: RetentionContext) -> Kept:
        kept = Kept()
        for policy in self.policies:
            kept |= policy.keep(records, context)
        return kept

    def metric_keys(self) -> frozenset[str]:
        return frozenset().union(*(policy.metric_keys() for policy in self.policies))


def manager_policy(max_to_keep: int | None, keep_checkpoint_every_n_hours: float | None,
                   keep_best: BestN | None = None, preservation: RetentionPolicy | None = None) -> RetentionPolicy:
    """The policy ``CheckpointManager``'s arguments mean.

    TensorFlow's two (a falsy ``hours`` is off, as in TensorFlow) plus ``keep_best``, or
    ``preservation`` alone: it replaces them, so ``max_to_keep`` must be ``None`` beside it.
    """
    if preservation is not None:
        if max_to_keep is not None or keep_checkpoint_every_n_hours or keep_best is not None:
            raise ValueError("preservation= replaces max_to_keep, keep_checkpoint_every_n_hours and keep_best: "
                             "pass max_to_keep=None and put LatestN / EveryNHours / BestN into the policy")
        metric_key(preservation)
        return preservation
    policies: list[RetentionPolicy] = [LatestN(max_to_keep)]
    if keep_checkpoint_every_n_hours:
        policies.append(EveryNHours(keep_checkpoint_every_n_hours))
    if keep_best is not None:
        policies.append(keep_best)
    return policies[0] if len(policies) == 1 else AnyOf(policies)


def metric_key(policy: RetentionPolicy) -> str | None:
    """The one ``save(metadata=...)`` key ``policy`` reads, if any.

    One at most: the state file keeps one metric value per checkpoint (``# cloudckpt-metric``).
    """
    keys = policy.metric_keys()
    if len(keys) > 1:
        raise ValueError(f"a manager's retention policy can read one metric, got {sorted(keys)}")
    return next(iter(keys), None)


@dataclass(frozen=True, slots=True)
class Sweep:
    """What the manager does after a save. Names keep the records' order.

    Attributes:
        active: stay on the active list (``all_model_checkpoint_paths``).
        preserved: leave it but stay on the store, for good.
        deleted: leave it and are deleted.
        last_preserved: the new ``last_preserved_timestamp``.
    """

    active: tuple[str, ...]
    preserved: tuple[str, ...]
    deleted: tuple[str, ...]
    last_preserved: float


def sweep(policy: RetentionPolicy, records: Sequence[CheckpointRecord], last_preserved: float) -> Sweep:
    """Apply ``policy`` to the active ``records`` (oldest saved first; the last one just saved).

    Preserved checkpoints leave the active list oldest first: once one that nothing keeps for
    now leaves, every older one kept for good leaves with it. So the mark ``EveryNHours``
    walks from (the newest preserved timestamp, as in TensorFlow) never passes a checkpoint it
    kept that is still active, and its decisions stay the same from one save to the next.
    """
    if not records:
        return Sweep((), (), (), last_preserved)
    kept = policy.keep(records, RetentionContext(last_preserved))
    for_now = kept.for_now | {records[-1].name}
    leaving = [i for i, r in enumerate(records) if r.name in kept.for_good and r.name not in for_now]
    cut = leaving[-1] + 1 if leaving else 0
    preserved = [r for r in records[:cut] if r.name in kept.for_good]
    gone = {r.name for r in preserved}
    return Sweep(
        active=tuple(r.name for r in records if r.name not in gone and (r.name in for_now or r.name in kept.for_good)),
        preserved=tuple(r.name for r in preserved),
        deleted=tuple(r.name for r in records if r.name not in for_now and r.name not in kept.for_good),
        last_preserved=preserved[-1].timestamp if preserved else last_preserved,
    )
