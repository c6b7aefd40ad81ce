"""Turn a preemption notice (SIGTERM) into "save at the next step boundary, then exit".

Cloud VMs get SIGTERM shortly before a preemption (GCE: 30 s, AWS spot: 2 min). Saving
inside the signal handler would interrupt the training step half-way (inconsistent
state) and run I/O in a signal context; instead the handler only sets a flag, and the
training loop calls ``save_checkpoint_if_preempted()`` once per step::

    handler = PreemptionCheckpointHandler(manager)
    for step in range(start, total):
        train_step()
        handler.save_checkpoint_if_preempted()   # saves, waits for the upload, exits

Many hosts: the signal usually reaches one VM, but every rank must save at the same
step or the save's collectives deadlock. With a multi-host manager (a
``DTensorCheckpoint``), each ``save_checkpoint_if_preempted`` call combines the flag
across ranks with one tiny all-reduce on the job's default process group - the training
loop's own group, called from the training thread like its other collectives, so it never
interleaves with a background save's traffic on the checkpoint group. A JAX job has no such
group: there the flag goes over a ``JaxCoordinator`` of the handler's own
(``Coordinator.for_training_thread``), apart from the one the saves use.

Named after TensorFlow's ``tf.distribute.experimental.PreemptionCheckpointHandler``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("cloudckpt.manager.preemption")


class _Manager(Protocol):
    """What the handler needs of a ``CheckpointManager``."""

    @property
    def coordinator(self) -> Any: ...

    def save(self, checkpoint_number: Any = None, check_interval: bool = True, options: Any = None,
             metadata: Mapping[str, Any] | None = None, *, tier: str = "bucket") -> str | None: ...

    def sync(self, timeout: float | None = None) -> None: ...


def _default_exit() -> None:
    sys.exit(0)


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every rank of the job's default ``torch.distributed`` group."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class PreemptionCheckpointHandler:
    """Installs signal handlers that request a final checkpoint; restores the old ones on close.

    Args:
        checkpoint_manager: the ``CheckpointManager`` to save with.
        signals: which signals mean "preempted" (default: SIGTERM).
        exit_fn: what to do after the final save (default: ``sys.exit(0)``, a clean exit
            the job scheduler restarts from the checkpoint).
    """

    def __init__(self, checkpoint_manager: _Manager, *, signals: Iterable[int] = (signal.SIGTERM,),
                 exit_fn: Callable[[], None] = _default_exit) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionCheckpointHandler must be created on the main thread "
                               "(Python delivers signals only there)")
        self._manager = checkpoint_manager
        coordinator = checkpoint_manager.coordinator
        own = coordinator.for_training_thread() if coordinator is not None else None  # a JAX job: no torch group
        self._combine: Callable[[bool], bool] | None = (
            None if coordinator is None else own.any if own is not None else any_rank)
        self._exit_fn = exit_fn
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag: no I/O and no locks inside a signal handler.
        self._event.set()

    @property
    def preempted(self) -> bool:
        """Whether a preemption signal arrived (or ``request_preemption`` was called)."""
        return self._event.is_set()

    def request_preemption(self) -> None:
        """Act as if the signal arrived (tests, or a scheduler's own notice channel)."""
        self._event.set()

    def save_checkpoint_if_preempted(self, metadata: Mapping[str, Any] | None = None) -> str | None:
        """If preempted: save now (ignoring the interval), wait for the upload, call ``exit_fn``.

        Returns ``None`` when not preempted. When ``exit_fn`` returns instead of exiting,
        returns the path saved. On many hosts, call it on every rank at every step: a
        signal on any one host makes all of them save at this step.
        """
        preempted = self.preempted if self._combine is None else self._combine(self.preempted)
        if not preempted:
            return None
        self._event.set()
        log.warning("preemption signal received: saving a final checkpoint before exiting")
        if getattr(self._manager, "local_tier", None) is not None:
            # The fast tier first: safe on a replica within seconds, then the same step to the bucket.
            local = self._manager.save(check_interval=False, metadata=metadata, tier="local")
            log.warning("final checkpoint %s committed on the local tier; now to the bucket", local)
            number = int(str(local).rpartition("-")[2])
            path = self._manager.save(checkpoint_number=number, check_interval=False, metadata=metadata)
        else:
            path = self._manager.save(check_interval=False, metadata=metadata)
        self._manager.sync()
        log.warning("final checkpoint %s committed; exiting", path)
        self.close()
        self._exit_fn()
        return path

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionCheckpointHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
