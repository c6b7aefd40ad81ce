"""``JaxCoordinator``: the coordinator protocol on JAX's own distributed runtime (jax never imported here).

A multi-process JAX job (``jax.distributed.initialize``) already runs a coordination
service with a key-value store and barriers; Orbax coordinates through it too. The
checkpoint's collectives go there - never through XLA collectives on the devices (an
async save runs them on a background thread, where device collectives would interleave
with the training step's) and without ``torch.distributed``.

How a collective works: every call takes the next number of the coordinator's sequence
(all processes make the same calls in the same order, so the numbers agree) and its keys
live under ``cloudckpt/<coordinator>/<number>/``. Each costs the store a number of reads
linear in the process count: ``gather_object`` - every rank posts its object, the
destination reads the N keys (and deletes them); ``broadcast_object`` - the source posts
one key, every other rank reads it; ``any`` - a gather of the flags to rank 0, then a
broadcast of their OR. Only ``all_gather_object`` reads N keys on each of N ranks (each
rank needs every object). A key read by others is deleted by its poster once it has proof
that every rank went past that collective: a barrier, an all-gather, or a gather it was
the destination of. Bytes for ``transfer`` are posted in pieces the receiver reads and deletes.

What travels: plans and statuses (small dataclasses, dicts, strings) pickled between the
processes of one job, as ``torch.distributed``'s object collectives do; the checkpoint
format never contains pickle, and nothing read from storage is ever unpickled.

Why here, below ``cloudckpt.jax``, and without importing jax: ``default_coordinator()``
must know a multi-process JAX job (a plain ``Checkpoint`` of sharded ``jax.Array``s in one
is coordinated, not refused), and only a process that already imported jax can be in one.
``cloudckpt.jax.coordinator`` re-exports it.
"""

from __future__ import annotations

import itertools
import pickle
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from cloudckpt.coordination import DEFAULT_TIMEOUT, Coordinator
from cloudckpt.errors import CoordinationError

#: Values larger than this are posted in pieces (the coordination service's gRPC messages are bounded).
PIECE_BYTES = 1 << 20
_T = TypeVar("_T")
_instances = itertools.count()


def _distributed_state() -> Any:
    """jax's distributed runtime state, or ``None`` if jax (or its runtime module) was never imported.

    The key-value store has no public accessor (Orbax reads it here too)."""
    module = sys.modules.get("jax._src.distributed") if "jax" in sys.modules else None
    return None if module is None else module.global_state


def in_jax_job() -> bool:
    """Whether this process belongs to a multi-process JAX job (``jax.distributed.initialize`` ran, with
    more than one process). Cheap and import-free: ``default_coordinator()`` asks it."""
    state = _distributed_state()
    return state is not None and state.client is not None and int(state.num_processes or 1) > 1


def _client() -> Any:
    """The distributed runtime's client (``jax.distributed.initialize`` made it)."""
    state = _distributed_state()
    if state is None or state.client is None:
        raise RuntimeError("JaxCoordinator needs jax.distributed.initialize() to have been called")
    return state.client


class JaxCoordinator(Coordinator):
    """The coordinator of a multi-process JAX job, on its distributed runtime's key-value store.

    Args:
        timeout: seconds a collective waits for the slowest process before it fails
            (``CoordinationError``), so one dead process fails every save in a minute.

    Construct it on every process in the same order relative to other ``JaxCoordinator``s
    (its keys are numbered by construction order); ``jax_coordinator()`` is the shared one.
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        if timeout <= 0:
            raise ValueError(f"JaxCoordinator timeout must be positive, got {timeout!r}")
        self._client = _client()
        jax = sys.modules["jax"]
        self.rank = int(jax.process_index())
        self.world_size = int(jax.process_count())
        self.timeout = float(timeout)
        self._prefix = f"cloudckpt/{next(_instances)}"
        self._sequence = 0
        self._lock = threading.Lock()
        #: Keys this process posted that other ranks read: ``(collective number, key)``, deleted by ``_sweep``.
        self._posted: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ key-value plumbing
    def _ms(self) -> int:
        return int(self.timeout * 1000)

    def _run(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except Exception as exc:  # the runtime raises its own error types on timeouts and lost tasks
            raise CoordinationError(f"rank {self.rank}: checkpoint collective {what} failed (a process died, timed "
                                    f"out after {self.timeout:g} s, or diverged): {exc}") from exc

    def _next(self) -> int:
        with self._lock:
            self._sequence += 1
            return self._sequence

    def _put(self, key: str, data: bytes) -> None:
        if len(data) <= PIECE_BYTES:
            self._client.key_value_set_bytes(key, b"\x00" + data)
            return
        count = 0
        for count, start in enumerate(range(0, len(data), PIECE_BYTES), 1):
            self._client.key_value_set_bytes(f"{key}/{count - 1}", data[start:start + PIECE_BYTES])
        self._client.key_value_set_bytes(key, b"\x01" + str(count).encode())

    def _get(self, key: str) -> bytes:
        head = bytes(self._client.blocking_key_value_get_bytes(key, self._ms()))
        if head[:1] == b"\x00":
            return head[1:]
        count = int(head[1:].decode())
        return b"".join(bytes(self._client.blocking_key_value_get_bytes(f"{key}/{i}", self._ms()))
                        for i in range(count))

    def _delete(self, key: str) -> None:
        self._client.key_value_delete(key)  # deletes the key and every key under "key/"

    def _key(self, number: int, rank: int | str) -> str:
        return f"{self._prefix}/{number}/{rank}"

    def _post(self, number: int, obj: Any, *, read_by_others: bool, name: int | str | None = None) -> None:
        key = self._key(number, self.rank if name is None else name)
        self._put(key, pickle.dumps(obj))
        if read_by_others:
            with self._lock:
                self._posted.append((number, key))

    def _sweep(self, passed: int) -> None:
        """Delete this process's keys of collectives before ``passed``: every rank has gone past them."""
        with self._lock:
            done = [key for number, key in self._posted if number < passed]
            self._posted = [(number, key) for number, key in self._posted if number >= passed]
        for key in done:
            self._delete(key)

    def _gather(self, number: int, obj: Any, dst: int) -> list[Any] | None:
        """Every rank's ``obj`` on ``dst`` (which reads and deletes the N - 1 others' keys), ``None`` elsewhere."""
        if self.rank != dst:
            self._post(number, obj, read_by_others=False)  # dst deletes it
            return None
        out: list[Any] = []
        for r in range(self.world_size):
            if r == self.rank:
                out.append(obj)
                continue
            key = self._key(number, r)
            out.append(pickle.loads(self._get(key)))
            self._delete(key)
        self._sweep(number)  # every rank posted this one: all went past the earlier collectives
        return out

    def _broadcast(self, number: int, obj: Any, src: int) -> Any:
        if self.rank == src:
            self._post(number, obj, read_by_others=True, name="from")
            return obj
        return pickle.loads(self._get(self._key(number, "from")))

    # ------------------------------------------------------------------ the protocol
    def barrier(self) -> None:
        number = self._next()
        self._run("barrier", lambda: self._client.wait_at_barrier(f"{self._prefix}/{number}/barrier", self._ms()))
        self._sweep(number)

    def all_gather_object(self, obj: Any) -> list[Any]:
        number = self._next()

        def run() -> list[Any]:
            self._post(number, obj, read_by_others=True)
            out = [obj if r == self.rank else pickle.loads(self._get(self._key(number, r)))
                   for r in range(self.world_size)]
            self._sweep(number)
            return out

        return self._run("all_gather_object", run)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        number = self._next()
        return self._run("gather_object", lambda: self._gather(number, obj, dst))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        number = self._next()
        return self._run("broadcast_object", lambda: self._broadcast(number, obj if self.rank == src else None, src))

    def any(self, flag: bool) -> bool:
        gathered, number = self._next(), self._next()

        def run() -> bool:
            flags = self._gather(gathered, bool(flag), 0)
            return bool(self._broadcast(number, None if flags is None else any(flags), 0))

        return self._run("any", run)

    def transfer(self, dst: int, outgoing: Sequence[NDArray[np.uint8]],
                 incoming: Mapping[int, Sequence[NDArray[np.uint8]]]) -> None:
        number = self._next()
        base = f"{self._prefix}/{number}/transfer"

        def run() -> None:
            if self.rank != dst:
                for i, buf in enumerate(outgoing):
                    self._put(f"{base}/{self.rank}/{i}", np.ascontiguousarray(buf).reshape(-1).tobytes())
                return
            for src in sorted(incoming):
                for i, buf in enumerate(incoming[src]):
                    key = f"{base}/{src}/{i}"
                    data = self._get(key)
                    flat = buf.reshape(-1)
                    if len(data) != flat.nbytes:
                        raise CoordinationError(f"rank {src} sent {len(data)} bytes for buffer {i}, "
                                                f"{flat.nbytes} were agreed")
                    flat[:] = np.frombuffer(data, dtype=np.uint8)
                    self._delete(key)

        self._run(f"transfer to rank {dst}", run)

    def for_training_thread(self) -> JaxCoordinator:
        """A coordinator of its own (its own keys and sequence) for collectives the training thread
        runs between steps - the preemption flag - which must never take a sequence number a
        background save's collective on this one expects. Construct it on every process together."""
        return JaxCoordinator(timeout=self.timeout)

    def __repr__(self) -> str:
        return f"JaxCoordinator(rank={self.rank}, world_size={self.world_size})"


_default: JaxCoordinator | None = None
_default_lock = threading.Lock()


def jax_coordinator() -> JaxCoordinator:
    """The process-wide ``JaxCoordinator`` (created on first use; every process must reach it together)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = JaxCoordinator()
        return _default
