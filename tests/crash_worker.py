"""A training loop that saves in a loop, for the crash-consistency suite to SIGKILL.

``python tests/crash_worker.py <directory-url> <report-file> [--steps N] [--max-to-keep K] [--big]``

Why a separate process: only a real SIGKILL proves a crash is harmless - no ``finally``,
no atexit, no buffered write survives it, exactly like a preempted VM. The test kills this
process either through ``CLOUDCKPT_CRASH_AT`` (cloudckpt/_testhooks.py) or from outside
at a random moment, then checks the directory from a fresh process.

The state saved under checkpoint number ``s`` is a pure function of ``s``
(:func:`state_for`), so the checker can tell exactly what each checkpoint must hold
without any record from the dead process. The only record the worker keeps is the
report file: one line ``"<number> <path>"`` appended and fsynced *after* ``save``
returned - the saves a user was told succeeded, none of which may ever be lost. Lines
starting with ``#`` are notes (what the run resumed from) and are not saves.

Imports stay light (numpy, boto3 through cloudckpt; never torch) so a restart costs well
under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cloudckpt import Checkpoint, CheckpointOptions, Trackable, Variable
from cloudckpt.manager import CheckpointManager
from cloudckpt.saving import objects as saving_objects
from cloudckpt.storage import TransferConfig, open_storage

MiB = 1024 * 1024
#: With ``--big``: the smallest part S3 accepts, so a 6 MiB array goes up as a real
#: two-part multipart upload (a kill in the middle leaves an incomplete upload behind).
SMALL_MULTIPART = 5 * MiB
BIG_ELEMENTS = (6 * MiB) // 4
#: Data objects of ~64 KiB instead of 256 MiB: every save writes several data objects
#: (up to the storage's max_concurrency), so kills land between them and deletions
#: remove more than one object, as they do for real-sized state.
OBJECT_SIZE = 64 * 1024


def state_for(step: int, big: bool = False) -> dict[str, Any]:
    """Everything checkpoint ``ckpt-<step>`` must hold; a pure function of ``step``.

    ``frozen`` never changes and ``embedding`` changes every third step, so every save is an
    incremental one (the manager's default) that references bytes of earlier checkpoints,
    and evictions drop checkpoints whose objects later ones still name.
    """
    rng = np.random.default_rng(1000 + step)
    state: dict[str, Any] = {
        "weights": rng.standard_normal((128, 256), dtype=np.float32),
        "bias": rng.standard_normal(1000),
        "embedding": np.random.default_rng(step // 3).integers(-30_000, 30_000, size=(7, 3001), dtype=np.int16),
        "frozen": np.random.default_rng(7).standard_normal(20_000, dtype=np.float32),
        "mask": rng.random(17) < 0.5,
        "hparams": {"lr": 0.1 / (step + 1), "epoch": step // 3, "tag": f"run-{step % 5}", "warm": step > 2},
        "step": step,
    }
    if big:
        state["big"] = np.arange(BIG_ELEMENTS, dtype=np.float32) * np.float32(0.5) + np.float32(step)
    return state


class TrainState(Trackable):
    """The live, mutable state: updated in place each step, saved and restored as a whole."""

    def __init__(self, big: bool = False) -> None:
        template = state_for(0, big)
        self.weights = Variable(np.zeros_like(template["weights"]))
        self.bias = Variable(np.zeros_like(template["bias"]))
        self.embedding = np.zeros_like(template["embedding"])
        self.frozen = np.zeros_like(template["frozen"])
        self.mask = np.zeros_like(template["mask"])
        self.hparams: dict[str, Any] = {"lr": 0.0, "epoch": -1, "tag": "", "warm": False}
        self.step = Variable(np.int64(0))
        if big:
            self.big = np.zeros_like(template["big"])

    def assign_step(self, step: int, big: bool = False) -> None:
        """Make the live state equal :func:`state_for` ``(step)`` - in place, as training would."""
        new = state_for(step, big)
        self.weights.assign(new["weights"])
        self.bias.assign(new["bias"])
        np.copyto(self.embedding, new["embedding"])
        np.copyto(self.frozen, new["frozen"])
        np.copyto(self.mask, new["mask"])
        self.hparams.clear()
        self.hparams.update(new["hparams"])
        self.step.assign(np.int64(step))
        if big:
            np.copyto(self.big, new["big"])

    def as_dict(self) -> dict[str, Any]:
        """The live values, shaped like :func:`state_for`, for comparisons."""
        values: dict[str, Any] = {
            "weights": self.weights.numpy(), "bias": self.bias.numpy(), "embedding": self.embedding,
            "frozen": self.frozen,
            "mask": self.mask, "hparams": dict(self.hparams), "step": int(self.step.numpy()),
        }
        if hasattr(self, "big"):
            values["big"] = self.big
        return values


def differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between two states (empty when equal bit for bit, dtypes and shapes included)."""
    problems = []
    if set(actual) != set(expected):
        problems.append(f"keys {sorted(actual)} != {sorted(expected)}")
    for key in sorted(set(actual) & set(expected)):
        a, e = actual[key], expected[key]
        if isinstance(e, np.ndarray):
            a = np.asarray(a)
            if a.dtype != e.dtype or a.shape != e.shape or not np.array_equal(a, e):
                problems.append(f"{key}: {a.dtype}{a.shape} differs from expected {e.dtype}{e.shape}")
        elif a != e or type(a) is not type(e):
            problems.append(f"{key}: {a!r} != expected {e!r}")
    return problems


def _append(report: Path, line: str) -> None:
    """Append one line and make it durable before going on: a SIGKILL must not lose it."""
    with open(report, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("report", type=Path)
    parser.add_argument("--steps", type=int, default=5, help="saves to make in this run")
    parser.add_argument("--max-to-keep", type=int, default=2)
    parser.add_argument("--big", action="store_true",
                        help="add a 6 MiB array and a 5 MiB multipart threshold (a real multipart upload)")
    parser.add_argument("--leftover-min-age", type=float, default=0.0)
    parser.add_argument("--async-saves", action="store_true",
                        help="save with enable_async; a save is reported once the next save (or the final sync) "
                             "has waited for it, as a training loop learns of it")
    args = parser.parse_args(argv)

    saving_objects.TARGET_OBJECT_SIZE = OBJECT_SIZE
    config = TransferConfig(multipart_threshold=SMALL_MULTIPART, part_size=SMALL_MULTIPART) if args.big else None
    storage = open_storage(args.directory, config=config)

    state = TrainState(args.big)
    ckpt = Checkpoint(state=state)
    manager = CheckpointManager(ckpt, args.directory, max_to_keep=args.max_to_keep, storage=storage,
                                leftover_min_age=args.leftover_min_age)
    resumed = manager.restore_or_initialize()
    start = int(state.step.numpy())
    if resumed is not None:
        problems = differences(state.as_dict(), state_for(start, args.big))
        if problems:
            print(f"restored {resumed} does not hold state_for({start}): {problems}", file=sys.stderr, flush=True)
            return 3
    _append(args.report, f"# resumed {resumed or '-'} at step {start} pid {os.getpid()}")
    options = CheckpointOptions(enable_async=True) if args.async_saves else None
    pending: str | None = None  # an async save not yet known to be committed
    for step in range(start + 1, start + 1 + args.steps):
        state.assign_step(step, args.big)  # with async saves: while the previous one may still upload
        path = manager.save(checkpoint_number=step, options=options)  # waits for (and re-raises) the previous
        if pending is not None:
            _append(args.report, pending)
        pending = f"{step} {path}"
        if options is None:
            _append(args.report, pending)
            pending = None
    manager.sync()
    if pending is not None:
        _append(args.report, pending)
    return 0


if __name__ == "__main__":
    sys.exit(main())
