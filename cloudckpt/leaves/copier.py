"""Device copies are a copier: bytes that live in device memory, and what moves them to and from the host.

Why a seam and not a branch: a CUDA tensor (or any array without a host view) is handed
to the save pipeline as a ``DeviceArray`` - its shape, dtype and byte count, no bytes - and
the pipeline asks that array's ``Copier`` to move batches of them into host memory it
chose (the async staging area, a ring slot of a sync save) or back (a restore's bounce
buffers). The copier decides how: the CPU copier runs the copies on one worker thread (its
"stream") and hands back a future as the "event"; the CUDA copier
(``cloudckpt.adapters.torch_device``) issues non-blocking copies on a side stream into
pinned memory and records a CUDA event. Everything above - the staging budget, the
batching, the ring bound, the rule that no byte is checksummed or uploaded before its copy
completed - is the same code for both, so CI tests it with the CPU copier.

This module is framework-free (numpy only); a framework's adapter subclasses
``DeviceArray`` for its own arrays.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, Union

import numpy as np
from numpy.typing import NDArray

HostBytes = NDArray[np.uint8]
K = TypeVar("K", bound=Hashable)


class Pending(Protocol):
    """A batch of copies in flight: ``wait`` returns once every copy of the batch completed."""

    def wait(self) -> None: ...


class DeviceArray(ABC):
    """An array whose bytes live in device memory: metadata now, bytes only through a copier.

    Attributes:
        shape, dtype: what the index records (``dtype`` is the stored numpy dtype, e.g.
            ``ml_dtypes.bfloat16`` for ``torch.bfloat16``).
        copier: the copier that serves this array's device.
        storage: ``(storage identity, byte offset, contiguous)``: two arrays with the same
            identity share memory, so one staging copy can serve both (tied weights, views).
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any], copier: Copier,
                 storage: tuple[Any, int, bool] | None = None) -> None:
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.copier = copier
        self.storage = storage

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @abstractmethod
    def copy_to_host(self, dest: HostBytes) -> None:
        """Issue the copy of every byte (C order) into ``dest`` (``nbytes`` bytes); the copier orders it."""

    @abstractmethod
    def copy_from_host(self, src: HostBytes, rows: tuple[int, int]) -> None:
        """Issue the copy of ``src`` (C-order bytes of rows ``rows`` of dimension 0; the whole array
        for a 0-d one) into this array's memory; the copier orders it."""

    def rows(self, start: int, stop: int) -> DeviceArray | None:
        """Rows ``[start, stop)`` of dimension 0 as a device array of their own (no copy), or
        ``None`` if this kind cannot cut itself (then it is copied whole)."""
        return None

    def host_view(self, buffer: HostBytes) -> NDArray[Any]:
        """``buffer``'s first ``nbytes`` bytes seen as this array (what staging hands the uploader)."""
        return buffer[:self.nbytes].view(self.dtype).reshape(self.shape)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} shape={self.shape} dtype={self.dtype} copier={self.copier.name}>"


class Copier(ABC):
    """Moves batches of ``DeviceArray`` bytes between device and host memory.

    A batch is issued at once (the CUDA copier queues it on its side stream) and returns a
    ``Pending``; nothing may read the host bytes of a batch before its ``wait`` returned.
    ``allocate_host`` is where staging and ring memory comes from (pinned for CUDA), so it is
    asked once per buffer and the buffers are reused.
    """

    name: str = ""

    @abstractmethod
    def allocate_host(self, nbytes: int) -> HostBytes:
        """``nbytes`` of host memory the copies may target (reused by the caller, never freed per save)."""

    def pin(self, buffer: HostBytes) -> None:  # noqa: B027 - optional hook
        """Make memory allocated elsewhere (the async staging mapping) fast to copy into; default: nothing."""

    def unpin(self, buffer: HostBytes) -> None:  # noqa: B027 - optional hook
        """Undo ``pin`` before ``buffer`` is freed; default: nothing."""

    @abstractmethod
    def to_host(self, batch: Sequence[tuple[DeviceArray, HostBytes]]) -> Pending:
        """Issue the copies of ``batch``'s arrays into their host buffers."""

    @abstractmethod
    def to_device(self, batch: Sequence[tuple[HostBytes, DeviceArray, tuple[int, int]]]) -> Pending:
        """Issue the copies of host bytes into rows ``(start, stop)`` of device arrays."""


class _Done:
    def wait(self) -> None:
        return None


DONE: Pending = _Done()


class _FuturePending:
    def __init__(self, future: Future[None]) -> None:
        self._future = future

    def wait(self) -> None:
        self._future.result()


class ThreadCopier(Copier):
    """The CPU copier: each batch runs in order on one worker thread, its future the event.

    Used wherever no CUDA device is (CI, a CPU-only host); the copies themselves are the
    arrays' own (``torch.Tensor.copy_`` for torch tensors). One thread, like one stream:
    batches complete in the order they were issued.
    """

    name = "cpu"

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _submit(self, work: Callable[[], None]) -> Pending:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudckpt-copier")
            return _FuturePending(self._pool.submit(work))

    def allocate_host(self, nbytes: int) -> HostBytes:
        return np.empty(nbytes, dtype=np.uint8)

    def to_host(self, batch: Sequence[tuple[DeviceArray, HostBytes]]) -> Pending:
        items = list(batch)

        def run() -> None:
            for array, dest in items:
                array.copy_to_host(dest)
        return self._submit(run)

    def to_device(self, batch: Sequence[tuple[HostBytes, DeviceArray, tuple[int, int]]]) -> Pending:
        items = list(batch)

        def run() -> None:
            for src, array, rows in items:
                array.copy_from_host(src, rows)
        return self._submit(run)


class CopierChoice:
    """Which copier one kind of device value uses, chosen on first need, and whether host values
    go through it too.

    One per kind (torch tensors, jax arrays). ``use`` swaps both for a block: the seam CI runs the
    device pipeline through (an instrumented copier, host values standing in for device ones) and
    a benchmark compares copiers with.
    """

    def __init__(self, choose: Callable[[], Copier]) -> None:
        self._choose = choose
        self._lock = threading.Lock()
        self._copier: Copier | None = None
        self._host_too = False

    def current(self) -> Copier:
        """The copier in use (the first call chooses it, under the lock, so once per process)."""
        with self._lock:
            if self._copier is None:
                self._copier = self._choose()
            return self._copier

    def routes_host(self) -> bool:
        """Whether host values go through the copier too (only inside ``use(..., host_too=True)``)."""
        with self._lock:
            return self._host_too

    @contextlib.contextmanager
    def use(self, copier: Copier, *, host_too: bool = False) -> Iterator[Copier]:
        """Use ``copier`` (and, with ``host_too``, for host values as well) within the block."""
        with self._lock:
            saved = (self._copier, self._host_too)
            self._copier, self._host_too = copier, host_too
        try:
            yield copier
        finally:
            with self._lock:
                self._copier, self._host_too = saved


class HostRing:
    """A bounded pool of reusable host buffers from one copier: what a sync save and a restore
    stream device bytes through, so host memory is bounded by the ring, not by the state.

    ``acquire(n)`` blocks until a buffer is free (at most ``slots`` exist; each grows to the
    largest request it served, and is allocated through the copier - pinned for CUDA).
    ``peak_in_use`` and ``allocated_bytes`` are what tests and benchmarks read.
    """

    def __init__(self, copier: Copier, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a host ring needs at least one slot, got {slots}")
        self.copier = copier
        self.slots = slots
        self._free: list[HostBytes] = []
        self._made = 0
        self._in_use = 0
        self.peak_in_use = 0
        self.allocated_bytes = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, timeout: float = 600.0) -> HostBytes:
        """A free buffer of at least ``nbytes`` (its first ``nbytes`` are the caller's until ``release``).

        Raises:
            TimeoutError: no buffer came free within ``timeout`` seconds (a holder never released).
        """
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free) or self._made < self.slots, timeout):
                raise TimeoutError(f"no host ring buffer came free within {timeout} s ({self.slots} slots)")
            buffer = self._free.pop() if self._free else None
            if buffer is None:
                self._made += 1
            self._in_use += 1
            self.peak_in_use = max(self.peak_in_use, self._in_use)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                self.allocated_bytes -= int(buffer.nbytes)
            buffer = self.copier.allocate_host(nbytes)
            with self._cond:
                self.allocated_bytes += int(buffer.nbytes)
        return buffer

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._in_use

    def release(self, buffer: HostBytes) -> None:
        with self._cond:
            self._free.append(buffer)
            self._in_use -= 1
            self._cond.notify()


def issue_to_host(arrays: Sequence[DeviceArray], buffers: Sequence[HostBytes]) -> Pending:
    """Issue the copies of ``arrays`` into ``buffers``, one batch per copier (usually one)."""
    by_copier: dict[int, tuple[Copier, list[tuple[DeviceArray, HostBytes]]]] = {}
    for array, buffer in zip(arrays, buffers, strict=True):
        by_copier.setdefault(id(array.copier), (array.copier, []))[1].append((array, buffer))
    pendings = [copier.to_host(batch) for copier, batch in by_copier.values()]
    if len(pendings) == 1:
        return pendings[0]
    return _All(pendings)


class _All:
    def __init__(self, pendings: Sequence[Pending]) -> None:
        self._pendings = list(pendings)

    def wait(self) -> None:
        for pending in self._pendings:
            pending.wait()


def shared_spans(arrays: Sequence[DeviceArray]) -> list[tuple[int, int] | None]:
    """For each array, ``(i, byte offset)`` if its bytes lie inside the bytes of ``arrays[i]``
    (an earlier or larger contiguous array on the same storage), else ``None`` (it must be copied).

    Why: views of one storage (tied weights, a slice of a buffer) are copied once; the others
    are host views of that copy.
    """
    out: list[tuple[int, int] | None] = [None] * len(arrays)
    owners: dict[Any, list[int]] = {}
    order = sorted(range(len(arrays)), key=lambda i: -arrays[i].nbytes)
    for i in order:
        info = arrays[i].storage
        if info is None or not info[2]:
            continue
        ident, offset, _ = info
        for j in owners.get(ident, ()):
            _, j_offset, _ = arrays[j].storage  # type: ignore[misc]
            if j_offset <= offset and offset + arrays[i].nbytes <= j_offset + arrays[j].nbytes:
                out[i] = (j, offset - j_offset)
                break
        else:
            owners.setdefault(ident, []).append(i)
    return out


#: Bytes to write: host memory, or device memory a copier moves.
HostOrDevice = Union[NDArray[Any], DeviceArray]  # noqa: UP007 - runtime alias on 3.10


@contextlib.contextmanager
def on_host(arrays: Mapping[K, HostOrDevice], wanted: Sequence[K], ring: HostRing | None
            ) -> Iterator[Mapping[K, NDArray[Any]]]:
    """``arrays[k]`` for each of ``wanted`` in host memory during the block: the device ones copied
    in one batch into one ``ring`` buffer (released when the block ends), handed out only after
    that batch's copy completed."""
    device = [k for k in wanted if isinstance(arrays[k], DeviceArray)]
    host: dict[K, NDArray[Any]] = {k: a for k in wanted if not isinstance(a := arrays[k], DeviceArray)}
    if not device:
        yield host
        return
    if ring is None:
        raise ValueError("device arrays need a host ring to be copied through")
    moved: list[DeviceArray] = [a for k in device if isinstance(a := arrays[k], DeviceArray)]
    offsets, size = [], 0
    for array in moved:
        offsets.append(size)
        size += -(-array.nbytes // 64) * 64
    buffer = ring.acquire(size)
    try:
        views = [buffer[at:at + a.nbytes] for at, a in zip(offsets, moved, strict=True)]
        issue_to_host(moved, views).wait()
        host.update({k: a.host_view(v) for k, a, v in zip(device, moved, views, strict=True)})
        yield host
    finally:
        ring.release(buffer)


def to_host_now(array: HostOrDevice) -> NDArray[Any]:
    """``array`` in fresh host memory now (a device array copied and waited for; a host one as is).

    For the rare step that must hold every byte at once (an io-device transfer over the engine)."""
    if not isinstance(array, DeviceArray):
        return array
    buffer = np.empty(array.nbytes, dtype=np.uint8)
    issue_to_host([array], [buffer]).wait()
    return array.host_view(buffer)
