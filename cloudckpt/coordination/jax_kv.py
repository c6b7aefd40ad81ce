"""``JaxCoordinator``: the coordinator protocol on JAX's own distributed runtime (jax never imported here).

A multi-process JAX job (``jax.distributed.initialize``) already runs a coordination
service with a key-value store and barriers; Orbax coordinates through it too. The
checkpoint's collectives go there - never through XLA collectives on the devices (an
async save runs them on a background thread, where device collectives would interleave
with the training step's) and without ``torch.distributed``.

How a collective works: each process posts its object under
``cloudckpt/<coordinator>/<sequence>/<rank>`` and reads every rank's (every collective is
an all-gather underneath; broadcast and gather just ignore what they do not need), so
each process's sequence advances in lockstep. A process deletes its own key of collective
``n - 1`` once collective ``n`` completed: every rank has posted ``n``, so every rank has
read ``n - 1``. Bytes for ``transfer`` are posted in pieces the receiver reads and deletes.

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

    def _exchange(self, what: str, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (the all-gather every object collective is)."""
        number = self._next()

        def run() -> list[Any]:
            self._put(f"{self._prefix}/{number}/{self.rank}", pickle.dumps(obj))
            out = [pickle.loads(self._get(f"{self._prefix}/{number}/{r}")) for r in range(self.world_size)]
            self._delete(f"{self._prefix}/{number - 1}/{self.rank}")
            return out

        return self._run(what, run)

    # ------------------------------------------------------------------ the protocol
    def barrier(self) -> None:
        number = self._next()
        self._run("barrier", lambda: self._client.wait_at_barrier(f"{self._prefix}/{number}/barrier", self._ms()))

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._exchange("all_gather_object", obj)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        gathered = self._exchange("gather_object", obj)
        return gathered if self.rank == dst else None

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self._exchange("broadcast_object", obj if self.rank == src else None)[src]

    def any(self, flag: bool) -> bool:
        return any(self._exchange("any", bool(flag)))

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
