"""Many simulated hosts in one process: a coordinator group whose ranks are threads.

Why: the multi-host save and restore (``cloudckpt.saving``, ``cloudckpt.restoring.io_host``) only
ever talk through a ``Coordinator``. A group of threads that meet at in-memory rendezvous
points runs that *same* code for 256 simulated hosts on one small machine - each rank
with its own ``Mesh``, its own shards and its own storage instance (and SDK client) -
where 256 ``torch.distributed`` processes would need 256 interpreters and a torch import
each. It is what ``bench scale`` uses, and what tests use to check protocols at a world
size that gloo processes cannot reach here.

Semantics follow ``TorchCoordinator``, so code that works here works there:

* every method is a collective, called by every rank in the same order; a rank that
  calls a different collective than the others at the same step is a divergence, and
  every rank of that step gets ``CoordinationError`` saying which ranks called what;
* objects travel as copies (a pickle round trip, as ``torch.distributed``'s ``*_object``
  collectives do), so no rank can see another's later mutations, and an object that
  could not cross a process boundary fails here too;
* every wait is bounded by ``timeout``; a collective that does not complete in time fails
  every rank waiting in it with ``CoordinationError`` naming the ranks that never came,
  and the group is then broken (as a gloo group is after a timeout): later collectives
  fail at once;
* ``abort(reason)`` breaks the group on purpose: ``run`` calls it when a rank's function
  raises, so the other ranks fail their next (or current) collective immediately,
  naming that rank, instead of waiting for the timeout.

Usage::

    group = ThreadGroup(8)
    def host(coordinator):
        mesh = Mesh(["x"], [8], coordinator=coordinator)
        ...  # this rank's state, storage and DTensorCheckpoint(mesh, ...).save(...)
    outcomes = group.run(host)   # one RankOutcome per rank, in rank order
"""

from __future__ import annotations

import pickle
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from cloudckpt.coordination import DEFAULT_TIMEOUT, Coordinator
from cloudckpt.errors import CoordinationError

T = TypeVar("T")


@dataclass
class _Round:
    """One step of the group's collective sequence: what each rank brought, and the result."""

    op: str
    arrived: dict[int, Any] = field(default_factory=dict)
    ops: dict[int, str] = field(default_factory=dict)
    done: bool = False
    error: str | None = None
    result: Any = None
    left: int = 0  # ranks that collected their result (the round is dropped when all did)


@dataclass(frozen=True, slots=True)
class RankOutcome(Generic[T]):
    """What one rank's function in ``ThreadGroup.run`` returned, or what it raised."""

    rank: int
    value: T | None = None
    error: BaseException | None = None
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class ThreadGroup:
    """``world_size`` ranks, each a thread of this process, meeting at in-memory collectives.

    Args:
        world_size: number of simulated ranks (>= 1).
        timeout: seconds any collective may wait for the other ranks (default: the
            checkpoint group's ``DEFAULT_TIMEOUT``).
        copy_objects: pass objects as pickle copies (default, like ``torch.distributed``);
            ``False`` hands every rank the same objects (cheaper at hundreds of ranks, for
            code known not to mutate what it receives).

    Raises:
        ValueError: a world size below one or a non-positive timeout.
    """

    def __init__(self, world_size: int, *, timeout: float = DEFAULT_TIMEOUT, copy_objects: bool = True) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"ThreadGroup world_size must be a positive int, got {world_size!r}")
        if not timeout > 0:
            raise ValueError(f"ThreadGroup timeout must be positive, got {timeout!r}")
        self.world_size = world_size
        self.timeout = float(timeout)
        self.copy_objects = copy_objects
        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}
        self._broken: str | None = None
        self._coordinators = [ThreadCoordinator(self, rank) for rank in range(world_size)]

    def coordinator(self, rank: int) -> ThreadCoordinator:
        """The coordinator of simulated rank ``rank`` (one object per rank, reused)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in this group of {self.world_size}")
        return self._coordinators[rank]

    @property
    def broken(self) -> str | None:
        """Why the group no longer runs collectives (``None`` while it is healthy)."""
        with self._cond:
            return self._broken

    def abort(self, reason: str) -> None:
        """Break the group: every waiting and every later collective raises ``CoordinationError``."""
        with self._cond:
            if self._broken is None:
                self._broken = reason
            self._cond.notify_all()

    def run(self, fn: Callable[[ThreadCoordinator], T], *, timeout: float | None = None) -> list[RankOutcome[T]]:
        """Run ``fn(coordinator)`` on one thread per rank; every rank's outcome, in rank order.

        A rank whose ``fn`` raises aborts the group, so the others cannot wait on it.
        ``timeout`` (default: ten collective timeouts) bounds the whole run: ranks still
        running then are reported with a ``TimeoutError`` (their threads are daemons and
        end with the process; the group is aborted so they fail their next collective).
        """
        limit = 10 * self.timeout if timeout is None else timeout
        outcomes: list[RankOutcome[T] | None] = [None] * self.world_size

        def body(rank: int) -> None:
            try:
                outcomes[rank] = RankOutcome(rank, value=fn(self._coordinators[rank]))
            except BaseException as exc:
                outcomes[rank] = RankOutcome(rank, error=exc, traceback=traceback.format_exc())
                self.abort(f"rank {rank} raised {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=body, args=(rank,), name=f"sim-rank-{rank}", daemon=True)
                   for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + limit
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        late = [rank for rank, thread in enumerate(threads) if thread.is_alive()]
        if late:
            self.abort(f"ranks {late} still running after {limit:g} s")
        return [outcome if outcome is not None else
                RankOutcome(rank, error=TimeoutError(f"rank {rank} did not finish within {limit:g} s"))
                for rank, outcome in enumerate(outcomes)]

    # ------------------------------------------------------------------ the rendezvous
    def _collective(self, rank: int, seq: int, op: str, value: Any,
                    combine: Callable[[dict[int, Any]], Any]) -> Any:
        """Bring ``value`` to step ``seq``; once every rank did, the last one ``combine``s them all.

        Returns the combined result (the same object for every rank; callers pick their part).
        """
        deadline = time.monotonic() + self.timeout
        with self._cond:
            if self._broken is not None:
                raise CoordinationError(f"rank {rank}: checkpoint collective {op} failed: the group is broken "
                                        f"({self._broken})")
            round_ = self._rounds.setdefault(seq, _Round(op))
            round_.arrived[rank] = value
            round_.ops[rank] = op
            if len(round_.arrived) == self.world_size:
                ops = set(round_.ops.values())
                if len(ops) > 1:
                    by_op: dict[str, list[int]] = {}
                    for r, o in sorted(round_.ops.items()):
                        by_op.setdefault(o, []).append(r)
                    round_.error = (f"ranks diverged at collective #{seq}: "
                                    + "; ".join(f"{o} on ranks {rs}" for o, rs in sorted(by_op.items())))
                    self._broken = round_.error
                else:
                    try:
                        round_.result = combine(round_.arrived)
                    except Exception as exc:  # e.g. transfer buffers of the wrong size
                        round_.error = f"{op} failed: {type(exc).__name__}: {exc}"
                round_.done = True
                round_.arrived = {}
                self._cond.notify_all()
            while not round_.done:
                if self._broken is not None:
                    raise CoordinationError(f"rank {rank}: checkpoint collective {op} failed: the group is broken "
                                            f"({self._broken})")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self.world_size)) - set(round_.ops))
                    self._broken = (f"collective {op} #{seq} timed out after {self.timeout:g} s waiting for ranks "
                                    f"{missing}")
                    self._cond.notify_all()
                    raise CoordinationError(f"rank {rank}: checkpoint collective {op} failed: {self._broken}")
                self._cond.wait(left)
            round_.left += 1
            if round_.left == self.world_size:
                del self._rounds[seq]
            if round_.error is not None:
                raise CoordinationError(f"rank {rank}: checkpoint collective {op} failed: {round_.error}")
            return round_.result

    def _pack(self, obj: Any) -> Any:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.copy_objects else obj

    def _unpack(self, packed: Any) -> Any:
        return pickle.loads(packed) if self.copy_objects else packed


class ThreadCoordinator(Coordinator):
    """One simulated rank of a ``ThreadGroup`` (see the module docs for the semantics)."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        super().__init__()
        self._group = group
        self.rank = rank
        self.world_size = group.world_size
        self._seq = 0

    def _step(self, op: str, value: Any, combine: Callable[[dict[int, Any]], Any]) -> Any:
        seq = self._seq
        self._seq += 1
        return self._group._collective(self.rank, seq, op, value, combine)

    def barrier(self) -> None:
        self._step("barrier", None, lambda _: None)

    def all_gather_object(self, obj: Any) -> list[Any]:
        packed = self._step("all_gather_object", self._group._pack(obj), _in_rank_order)
        return [self._group._unpack(p) for p in packed]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        self._check_rank("gather_object dst", dst)
        packed = self._step(f"gather_object(dst={dst})", self._group._pack(obj), _in_rank_order)
        return [self._group._unpack(p) for p in packed] if self.rank == dst else None

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self._check_rank("broadcast_object src", src)
        mine = self._group._pack(obj) if self.rank == src else None
        packed = self._step(f"broadcast_object(src={src})", mine, lambda arrived: arrived[src])
        return self._group._unpack(packed)

    def any(self, flag: bool) -> bool:
        return bool(self._step("any", bool(flag), lambda arrived: any(arrived.values())))

    def transfer(self, dst: int, outgoing: Sequence[NDArray[np.uint8]],
                 incoming: Mapping[int, Sequence[NDArray[np.uint8]]]) -> None:
        self._check_rank("transfer dst", dst)
        value = dict(incoming) if self.rank == dst else list(outgoing)
        self._step(f"transfer(dst={dst})", value, lambda arrived: _deliver(dst, arrived))

    def _check_rank(self, what: str, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"{what}={rank} is not a rank of this group of {self.world_size}")

    def __repr__(self) -> str:
        return f"ThreadCoordinator(rank={self.rank}, world_size={self.world_size})"


def _in_rank_order(arrived: dict[int, Any]) -> list[Any]:
    return [arrived[rank] for rank in sorted(arrived)]


def _deliver(dst: int, arrived: dict[int, Any]) -> None:
    """Copy every sender's buffers into the receive buffers rank ``dst`` posted, checking sizes.

    As with gloo's send/recv, both sides must agree beforehand on how many buffers of
    which sizes travel; a mismatch fails the collective on every rank instead of
    delivering a truncated or shifted byte stream.
    """
    incoming: Mapping[int, Sequence[NDArray[np.uint8]]] = arrived[dst]
    unexpected = sorted(src for src in incoming if src == dst or src not in arrived)
    if unexpected:
        raise ValueError(f"rank {dst} expected bytes from ranks {unexpected}, which are not senders")
    for src, outgoing in arrived.items():
        if src == dst:
            continue
        receive = list(incoming.get(src, ()))
        sizes = [int(b.nbytes) for b in outgoing]
        if sizes != [int(b.nbytes) for b in receive]:
            raise ValueError(f"rank {src} sent buffers of {sizes} bytes to rank {dst}, which expected "
                             f"{[int(b.nbytes) for b in receive]}")
        for sent, into in zip(outgoing, receive, strict=True):
            np.copyto(into.reshape(-1), np.asarray(sent).reshape(-1).view(np.uint8))
