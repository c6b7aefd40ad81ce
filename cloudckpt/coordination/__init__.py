"""How the processes of a job talk during a checkpoint: a small coordinator protocol.

One host is the one-rank case (``LocalCoordinator``): every save runs the same protocol
(``cloudckpt.saving``) whatever the number of hosts.

A multi-host save needs only a handful of things from the job's process engine: who am
I (``rank``), how many are we (``world_size``), wait for everyone (``barrier``), share a
small plan (``all_gather_object``, ``gather_object``, ``broadcast_object``), agree on a
flag (``any``), and move shard bytes to one host (``transfer``, for ``io_device``).
``LocalCoordinator`` is the single-process default (every call is trivial), so one-host
users pay nothing; ``TorchCoordinator`` runs on ``torch.distributed``. Nothing here
opens a socket of its own.

Why a dedicated gloo group: an async save runs its collectives on a background thread.
On the training loop's own group they would interleave with the loop's collectives and
deadlock or corrupt both; on a group of their own they cannot. The group is created when
the coordinator is (``new_group`` is a collective every rank must call, in the same
order - so at start-up, never inside a background save), and its timeout is short
(default 60 s, not gloo's 30 minutes) so that one dead host fails every rank's save in
a minute instead of hanging them for half an hour.

What travels as objects: plans and statuses - plain dicts, lists, strings and ints.
``torch.distributed``'s ``*_object`` collectives pickle those internally, between the
processes of one job; the *checkpoint format* never contains pickle, and shard bytes
never go through the object collectives (they travel as uint8 tensors).
"""

from __future__ import annotations

import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import CoordinationError
from cloudckpt.options import CheckpointOptions

#: Default timeout of the checkpoint group's collectives, in seconds.
DEFAULT_TIMEOUT = 60.0
#: Shard bytes travel in messages of at most this size, so that each message finishes
#: well within the group's timeout even on a slow network.
MESSAGE_BYTES = 16 * 1024 * 1024


class Coordinator(ABC):
    """The calls a multi-host checkpoint makes between processes.

    Every method except the properties is a *collective*: all ranks call it, in the same
    order. Objects passed must be plain JSON-like data (dict, list, str, int, float,
    bool, None).
    """

    rank: int
    world_size: int

    def __init__(self) -> None:
        self._session_lock = threading.Lock()

    @property
    def is_primary(self) -> bool:
        """Rank 0: the host that commits indexes and (for a manager) owns the state file."""
        return self.rank == 0

    @contextmanager
    def session(self) -> Iterator[None]:
        """Hold the coordinator for one whole protocol run (a save), so two saves of one
        process (say, two checkpoints' background workers) never interleave collectives."""
        self.begin_session()
        try:
            yield
        finally:
            self.end_session()

    def begin_session(self) -> None:
        """``session()`` for a run that starts on one thread and ends on another (an async
        save plans on the caller's thread and commits on its worker): pair with ``end_session``."""
        self._session_lock.acquire()

    def end_session(self) -> None:
        self._session_lock.release()

    @abstractmethod
    def barrier(self) -> None:
        """Return once every rank has called it."""

    @abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank, on every rank."""

    @abstractmethod
    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on rank ``dst`` (``None`` elsewhere)."""

    @abstractmethod
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (the others' argument is ignored)."""

    @abstractmethod
    def any(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on at least one (a preemption notice, an error)."""

    @abstractmethod
    def transfer(self, dst: int, outgoing: Sequence[NDArray[np.uint8]],
                 incoming: Mapping[int, Sequence[NDArray[np.uint8]]]) -> None:
        """Move bytes to rank ``dst``: every other rank sends ``outgoing`` (flat uint8
        arrays, in order); rank ``dst`` receives into ``incoming[src]`` (buffers of the
        same sizes, in the same order, agreed beforehand)."""

    def all_reduce_flag(self, flag: bool) -> bool:
        """Same as ``any`` (the name the manager's preemption helper reads best with)."""
        return self.any(flag)

    def for_training_thread(self) -> Coordinator | None:
        """A coordinator over the same processes for the training thread's own collectives (the
        preemption flag, between steps), apart from this one's (a background save may be running
        its collectives on it); ``None``: the job's own process group serves (torch's default group)."""
        return None


class LocalCoordinator(Coordinator):
    """One process: rank 0 of 1. Every collective returns at once."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = 0
        self.world_size = 1

    def barrier(self) -> None:
        return None

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def transfer(self, dst: int, outgoing: Sequence[NDArray[np.uint8]],
                 incoming: Mapping[int, Sequence[NDArray[np.uint8]]]) -> None:
        if dst != 0:
            raise ValueError(f"transfer dst={dst} does not exist in a single-process job")

    def __repr__(self) -> str:
        return "LocalCoordinator()"


class TorchCoordinator(Coordinator):
    """The coordinator of a ``torch.distributed`` job, on a gloo group of its own.

    Args:
        timeout: seconds (or a ``timedelta``) every collective of the checkpoint group
            may take before it fails. Uploads longer than this are fine: a save polls
            with short collectives while data is in flight, so only a host that stops
            answering for ``timeout`` fails the save.
        group: an existing gloo group spanning every rank, instead of creating one.

    Creating one is a collective (``torch.distributed.new_group``): every rank must do it,
    in the same order relative to its other ``new_group`` calls - at start-up, after
    ``init_process_group``, never from a background thread.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: a non-positive timeout, or a group that does not span every rank.
    """

    def __init__(self, *, timeout: float | timedelta = DEFAULT_TIMEOUT, group: Any = None) -> None:
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchCoordinator needs torch.distributed.init_process_group() to have been called")
        delta = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        if delta.total_seconds() <= 0:
            raise ValueError(f"TorchCoordinator timeout must be positive, got {timeout!r}")
        if group is None:
            group = dist.new_group(backend="gloo", timeout=delta)
        if dist.get_world_size(group) != dist.get_world_size():
            raise ValueError("TorchCoordinator group must span every rank of the job")
        self._dist = dist
        self._group = group
        self.timeout = delta
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]

    @property
    def group(self) -> Any:
        """The gloo process group (for tools that want to reuse it)."""
        return self._group

    def _run(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # gloo timeouts and closed connections (DistBackendError too)
            raise CoordinationError(f"rank {self.rank}: checkpoint collective {what} failed (a host died, "
                                    f"timed out after {self.timeout.total_seconds():g} s, or diverged): "
                                    f"{exc}") from exc

    def barrier(self) -> None:
        self._run("barrier", lambda: self._dist.barrier(group=self._group))

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._run("all_gather_object", lambda: self._dist.all_gather_object(out, obj, group=self._group))
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        self._run("gather_object", lambda: self._dist.gather_object(obj, out, dst=self._global[dst],
                                                                    group=self._group))
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        self._run("broadcast_object", lambda: self._dist.broadcast_object_list(box, src=self._global[src],
                                                                               group=self._group))
        return box[0]

    def any(self, flag: bool) -> bool:
        import torch

        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._run("all_reduce", lambda: self._dist.all_reduce(value, op=self._dist.ReduceOp.MAX, group=self._group))
        return bool(value.item())

    def transfer(self, dst: int, outgoing: Sequence[NDArray[np.uint8]],
                 incoming: Mapping[int, Sequence[NDArray[np.uint8]]]) -> None:
        import torch

        def slices(buffers: Sequence[NDArray[np.uint8]]) -> Iterator[Any]:
            for buf in buffers:
                flat = buf.reshape(-1)
                for start in range(0, flat.nbytes, MESSAGE_BYTES):
                    yield torch.from_numpy(flat[start:start + MESSAGE_BYTES])

        def run() -> None:
            if self.rank == dst:
                # Post every receive first: senders then never wait for us to get to them.
                works = [self._dist.irecv(t, src=self._global[src], group=self._group)
                         for src in sorted(incoming) for t in slices(incoming[src])]
                for work in works:
                    work.wait()
            else:
                for t in slices([b if b.flags.writeable else b.copy() for b in outgoing]):
                    self._dist.send(t, dst=self._global[dst], group=self._group)

        self._run(f"transfer to rank {dst}", run)

    def __repr__(self) -> str:
        return f"TorchCoordinator(rank={self.rank}, world_size={self.world_size})"


_default: Coordinator | None = None
_default_lock = threading.Lock()


def default_coordinator() -> Coordinator:
    """The process-wide coordinator: ``TorchCoordinator`` in a multi-process torch job,
    ``JaxCoordinator`` in a multi-process JAX job (``jax.distributed.initialize``), else local.

    Created on first use and then shared (one checkpoint group per process). Call it -
    or construct a ``Mesh`` - on every rank at start-up: creating the group is collective.
    """
    global _default
    with _default_lock:
        if _default is None:
            dist = sys.modules.get("torch.distributed")
            if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                _default = TorchCoordinator()
            else:
                from cloudckpt.coordination.jax_kv import in_jax_job, jax_coordinator  # never imports jax

                if not in_jax_job():
                    return LocalCoordinator()
                _default = jax_coordinator()
        return _default


def set_default_coordinator(coordinator: Coordinator | None) -> None:
    """Make ``coordinator`` the one meshes use by default (``None``: decide again on next use)."""
    global _default
    with _default_lock:
        _default = coordinator


def io_rank(options: CheckpointOptions, coordinator: Coordinator) -> int | None:
    """The rank that alone touches storage, or ``None`` (every rank writes its own shards).

    TensorFlow device syntax names the host: ``/job:worker/replica:0/task:K`` (any job
    name) is rank ``K`` of ``coordinator``; ``/job:localhost`` (or no task) means "this
    process" - every host does its own I/O, the default. In one process every value is a no-op.

    Raises:
        ValueError: ``experimental_io_device`` names a task outside the job, or a replica
            other than 0 (naming the option).
    """
    spec = options.io_device_spec
    if spec is None or coordinator.world_size == 1:
        return None
    if spec.job == "localhost" or spec.task is None:
        return None
    if spec.replica not in (None, 0):
        raise ValueError(f"experimental_io_device {options.experimental_io_device!r}: only replica 0 exists in a "
                         f"torch.distributed job")
    if not 0 <= spec.task < coordinator.world_size:
        raise ValueError(f"experimental_io_device {options.experimental_io_device!r}: task {spec.task} is not a rank "
                         f"of this job of {coordinator.world_size} processes")
    return spec.task
