"""The main job: train, get SIGKILLed mid-run, resume, and end bit-identical to an unbroken run.

``python -m cloudckpt.demo [DIRECTORY_OR_URL]`` (``./run demo``). Steps:

1. Train a small numpy model (linear regression, minibatch SGD with momentum; the
   minibatches come from a ``numpy.random.Generator``) for ``--steps`` steps without
   checkpoints: the reference weights.
2. Start the same training in a child process, checkpointed every ``--save-every`` steps
   by a ``CheckpointManager`` into the directory, and SIGKILL it at ``--kill-at``.
3. Start it again: it resumes from the latest committed checkpoint (weights, optimizer
   state, step and the random stream) and finishes.
4. Compare the resumed run's final weights with the reference: they must be identical.

The directory defaults to ``./demo-checkpoints`` on local disk; any URL works
(``s3://bucket/run``, ``gs://bucket/run``) with the usual credentials. Each run writes
under a fresh prefix of its own in it (``demo-<UTC time>-<random>``), never into what an
earlier run left: resuming an earlier run's finished checkpoints would kill nothing and
still claim a crash. Nothing is deleted, and the demo fails (exit 1) unless the first
worker was really SIGKILLed and the second really resumed from a checkpoint saved before
the kill.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from cloudckpt import Checkpoint, Trackable, Variable
from cloudckpt.manager import CheckpointManager
from cloudckpt.storage import join_url, resolve_directory

FEATURES = 32
BATCH = 64
LEARNING_RATE = 0.05
MOMENTUM = 0.9


class Model(Trackable):
    """Weights plus SGD-momentum state: everything that must survive a preemption."""

    def __init__(self) -> None:
        self.weights = Variable(np.zeros(FEATURES))
        self.velocity = Variable(np.zeros(FEATURES))


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(4096, FEATURES))
    true_w = rng.normal(size=FEATURES)
    return x, x @ true_w + 0.1 * rng.normal(size=4096)


def train_step(model: Model, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> float:
    batch = rng.integers(0, len(x), BATCH)
    xb, yb = x[batch], y[batch]
    error = xb @ model.weights.numpy() - yb
    grad = xb.T @ error / BATCH
    model.velocity.assign(MOMENTUM * model.velocity.numpy() - LEARNING_RATE * grad)
    model.weights.assign_add(model.velocity.numpy())
    return float(np.mean(error ** 2))


def reference(steps: int) -> np.ndarray:
    x, y = make_data()
    model, rng = Model(), np.random.default_rng(7)
    for _ in range(steps):
        train_step(model, rng, x, y)
    return model.weights.numpy().copy()


def worker(directory: str, steps: int, save_every: int) -> None:
    """One training process: resume if possible, save every few steps, report progress."""
    x, y = make_data()
    model, rng, step = Model(), np.random.default_rng(7), Variable(np.int64(0))
    ckpt = Checkpoint(model=model, rng=rng, step=step)
    manager = CheckpointManager(ckpt, directory, max_to_keep=3)
    resumed = manager.restore_or_initialize()
    print(f"worker pid {os.getpid()}: " + (f"resumed from {resumed} at step {int(step)}" if resumed
                                             else "no checkpoint, starting fresh"), flush=True)
    while int(step) < steps:
        loss = train_step(model, rng, x, y)
        step.assign_add(1)
        if int(step) % save_every == 0:
            path = manager.save(checkpoint_number=int(step))
            print(f"step {int(step)} loss {loss:.4f} saved {path}", flush=True)
        else:
            print(f"step {int(step)} loss {loss:.4f}", flush=True)
    manager.save(checkpoint_number=int(step))
    print(f"finished at step {int(step)}", flush=True)


@dataclass(frozen=True)
class WorkerRun:
    """What one worker process did, as the demo saw it.

    Attributes:
        exit_code: the process's exit code (``-9``: the demo's SIGKILL).
        resumed_at: the step of the checkpoint it resumed from (``None``: it started fresh).
    """

    exit_code: int
    resumed_at: int | None

    @property
    def killed(self) -> bool:
        return self.exit_code == -signal.SIGKILL


def fresh_prefix(directory: str) -> str:
    """A new, empty prefix under ``directory`` for this run.

    Raises:
        SystemExit: the prefix already holds objects (another run picked the same name).
    """
    run = join_url(directory, f"demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}")
    if resolve_directory(run).list():
        raise SystemExit(f"{run} is not empty; the demo needs a fresh prefix to show a real crash and resume")
    return run


def run_worker_until(directory: str, args: argparse.Namespace, kill_at: int | None) -> WorkerRun:
    """Run a worker process on ``directory``; SIGKILL it when it reports step ``kill_at``."""
    cmd = [sys.executable, "-m", "cloudckpt.demo", "--worker", directory,
           "--steps", str(args.steps), "--save-every", str(args.save_every)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    resumed_at = None
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("worker") or "saved" in line or line.startswith("finished"):
            print(f"  | {line}")
        resumed = re.search(r"resumed from \S+ at step (\d+)$", line)
        if resumed:
            resumed_at = int(resumed.group(1))
        if kill_at is not None and line.startswith(f"step {kill_at} "):
            os.kill(proc.pid, signal.SIGKILL)
            print(f"  ! SIGKILL sent to pid {proc.pid} after step {kill_at} (a preempted VM gets no warning)")
            break
        if time.monotonic() > deadline:
            proc.kill()
            break
    proc.stdout.close()
    return WorkerRun(proc.wait(timeout=60), resumed_at)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloudckpt.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", default="demo-checkpoints",
                        help="checkpoint directory or URL (default: ./demo-checkpoints); each run writes under a "
                             "fresh prefix in it")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--kill-at", type=int, default=137)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.directory, args.steps, args.save_every)
        return 0
    if not 0 < args.kill_at < args.steps:
        parser.error("--kill-at must be between 0 and --steps")

    print(f"1. reference: {args.steps} uninterrupted steps, no checkpoints")
    expected = reference(args.steps)
    directory = fresh_prefix(args.directory)
    print(f"2. checkpointed run into {directory} (a fresh prefix), killed at step {args.kill_at}")
    first = run_worker_until(directory, args, kill_at=args.kill_at)
    print(f"   worker exit code {first.exit_code} (-9 = SIGKILL)")
    if not first.killed or first.resumed_at is not None:
        print(f"the first worker was not killed at step {args.kill_at} in a fresh run (exit code "
              f"{first.exit_code}, resumed at {first.resumed_at}): no crash to recover from", file=sys.stderr)
        return 1
    print("3. a new process resumes from the latest committed checkpoint")
    second = run_worker_until(directory, args, kill_at=None)
    if second.exit_code != 0:
        print("resumed worker failed", file=sys.stderr)
        return 1
    if second.resumed_at is None or second.resumed_at > args.kill_at:
        print(f"the second worker did not resume from a checkpoint saved before step {args.kill_at} "
              f"(resumed at {second.resumed_at})", file=sys.stderr)
        return 1

    restored = Model()
    final = CheckpointManager(Checkpoint(model=restored), directory, max_to_keep=3)
    path = final.latest_checkpoint
    Checkpoint(model=restored).read(path).expect_partial()
    identical = np.array_equal(restored.weights.numpy(), expected)
    print(f"4. final weights from {path} {'are bit-identical to' if identical else 'DIFFER from'} "
          f"the uninterrupted run (max |diff| = {np.max(np.abs(restored.weights.numpy() - expected)):.3g})")
    print(f"   checkpoints kept: {[p.rsplit('/', 1)[-1] for p in final.checkpoints]}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
