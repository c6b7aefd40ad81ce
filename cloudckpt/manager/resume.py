"""Resuming from the newest *intact* checkpoint: a damaged latest one must not stop a job.

A checkpoint can be committed and still unreadable: a flipped byte on the store, a data
object deleted by hand, a truncated object. Raising on it would leave a preempted job unable
to restart until someone intervenes; silently initialising from scratch would throw training
away. ``restore_newest_intact`` tries the candidates newest first, warns about each damaged
one (naming it and the cause), and stops at the first that restores - fully, so whatever a
failed attempt had already written into the live objects is overwritten by the intact
checkpoint's values. Errors that are not damage (the program's objects do not match the
checkpoint, credentials, the network) are raised at once: trying older checkpoints would not
help and could hide the real problem. Neither is a checkpoint of a *newer format version*:
it is intact for the cloudckpt that wrote it, which owns the directory now, so the resume
stops with the same ``CheckpointVersionError`` (upgrade cloudckpt) a plain restore raises.

On many hosts every rank restores, and one rank's damage (its byte ranges) must move every
rank to the next candidate: each attempt ends with one all-gather of the ranks' outcomes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cloudckpt.coordination import Coordinator
from cloudckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ChecksumError,
    CloudCkptError,
    NoIntactCheckpointError,
)
from cloudckpt.format.index_fetch import newer_format

#: What makes a committed checkpoint unusable (as opposed to unusable *here*) - except an
#: index of a newer format version (``index_fetch.newer_format``), which is not damage.
DAMAGE = (ChecksumError, CheckpointFormatError, CheckpointNotFoundError)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One rank's result of one restore attempt."""

    damage: str | None = None
    fatal: str | None = None


def restore_newest_intact(restore: Callable[[str], None], candidates: Sequence[str], url_for: Callable[[str], str],
                          coordinator: Coordinator | None = None) -> tuple[str, list[str]]:
    """Restore the first of ``candidates`` (newest first) that is intact; return it and the skipped ones.

    Raises:
        NoIntactCheckpointError: every candidate is damaged (each cause listed).
        CheckpointVersionError: a candidate is of a newer format version (upgrade cloudckpt).
        CheckpointMismatchError, StorageError, ...: a failure that is not damage, at once.
    """
    skipped: list[str] = []
    causes: dict[str, str] = {}
    for name in candidates:
        error: BaseException | None = None
        try:
            restore(name)
            mine = Outcome()
        except DAMAGE as exc:
            what = f"{type(exc).__name__}: {exc}"
            if newer_format(exc) is None:
                error, mine = exc, Outcome(damage=what)
            elif coordinator is None:
                raise
            else:
                error, mine = exc, Outcome(fatal=what)
        except Exception as exc:
            error, mine = exc, Outcome(fatal=f"{type(exc).__name__}: {exc}")
            if coordinator is None:
                raise
        outcomes = coordinator.all_gather_object(mine) if coordinator is not None else [mine]
        if all(o.damage is None and o.fatal is None for o in outcomes):
            return name, skipped
        fatal = [o.fatal for o in outcomes if o.fatal is not None]
        if fatal:
            if error is not None and mine.fatal is not None:
                raise error
            raise CloudCkptError(f"restoring {url_for(name)} failed on another host: {fatal[0]}")
        cause = next(o.damage for o in outcomes if o.damage is not None)
        causes[name] = cause
        skipped.append(name)
        message = (f"checkpoint {url_for(name)} is damaged or incomplete ({cause}); restoring the next older "
                   f"committed checkpoint instead. `cloudckpt verify` shows what is wrong with it")
        warnings.warn(message, RuntimeWarning, stacklevel=3)  # once: a log line as well printed it twice
    listed = "; ".join(f"{url_for(n)}: {c}" for n, c in causes.items())
    raise NoIntactCheckpointError(f"no intact checkpoint to restore - every committed one is damaged: {listed}",
                                  causes)
