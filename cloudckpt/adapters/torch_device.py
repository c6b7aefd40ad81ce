"""torch tensors off the CPU: ``DeviceArray``s and their copiers (the CUDA one, and the CPU one elsewhere).

Why here: a tensor on a device has no numpy view, so the tensor leaf kind hands the save
pipeline a ``TorchDeviceArray`` (metadata only) instead of ``tensor.cpu()`` - one pageable,
synchronous copy per tensor, then a second copy into staging. The pipeline batches them
through a ``Copier`` (``cloudckpt.leaves.copier``):

- ``CudaCopier``: host memory from torch's pinned allocator (``torch.empty(pin_memory=True)``,
  page-locked, reused by the staging area and the rings), copies issued with
  ``non_blocking=True`` on one side stream that first waits for the caller's current
  stream (so the bytes are the ones the training step wrote), finished by one CUDA event per
  batch. Not measured on a GPU in this repository yet (docs/benchmarks.md).
- the CPU copier (``ThreadCopier``) for every other device, and for CI: ``torch.cuda.is_available()``
  false chooses it, and the choice is logged once.

``use_copier`` is the test seam: it sets the copier and, with ``cpu_tensors=True``, routes CPU
tensors through the device path too, so the ring, batching, budget and ordering run in CI.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from cloudckpt.adapters.torch import tensor_meta
from cloudckpt.leaves.copier import Copier, CopierChoice, DeviceArray, HostBytes, Pending, ThreadCopier

log = logging.getLogger("cloudckpt.adapters.torch_device")


def _bytes_tensor(buffer: HostBytes, nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` of a host buffer as a uint8 tensor sharing its memory."""
    return torch.from_numpy(buffer[:nbytes])


class TorchDeviceArray(DeviceArray):
    """A torch tensor whose bytes are read (and written, on restore) through a copier."""

    def __init__(self, tensor: torch.Tensor, copier: Copier) -> None:
        shape, dtype = tensor_meta(tensor)
        storage = tensor.untyped_storage()
        ident = (tensor.device.type, tensor.device.index, storage.data_ptr())
        offset = int(tensor.storage_offset()) * tensor.element_size()
        super().__init__(shape, dtype, copier, (ident, offset, tensor.is_contiguous()))
        self.tensor = tensor.detach()
        #: The stream the caller's work on this tensor is queued on (captured on the caller's thread,
        #: which collect and restore run on): the side stream waits for it before copying.
        self.producer: Any = torch.cuda.current_stream(tensor.device) if tensor.is_cuda else None

    def rows(self, start: int, stop: int) -> TorchDeviceArray:
        block = TorchDeviceArray(self.tensor[start:stop], self.copier)
        block.producer = self.producer
        return block

    def _host(self, buffer: HostBytes, nbytes: int, shape: Sequence[int]) -> torch.Tensor:
        return _bytes_tensor(buffer, nbytes).view(self.tensor.dtype).view(tuple(shape))

    def copy_to_host(self, dest: HostBytes) -> None:
        host = self._host(dest, self.nbytes, self.shape)
        host.copy_(self.tensor, non_blocking=isinstance(self.copier, CudaCopier))

    def copy_from_host(self, src: HostBytes, rows: tuple[int, int]) -> None:
        target = self.tensor if self.tensor.ndim == 0 else self.tensor[rows[0]:rows[1]]
        nbytes = target.numel() * target.element_size()
        with torch.no_grad():
            target.copy_(self._host(src, nbytes, target.shape), non_blocking=isinstance(self.copier, CudaCopier))


class _CudaPending:
    def __init__(self, event: Any) -> None:
        self._event = event

    def wait(self) -> None:
        self._event.synchronize()


class CudaCopier(Copier):
    """Pinned host memory, non-blocking copies on one side stream, one event per batch."""

    name = "cuda"

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self._stream: Any = None
        self._lock = threading.Lock()
        self._registered: set[int] = set()

    def _side_stream(self) -> Any:
        with self._lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            return self._stream

    def allocate_host(self, nbytes: int) -> HostBytes:
        pinned = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        array: HostBytes = pinned.numpy()[:nbytes]
        return array  # the numpy view keeps the pinned tensor's memory alive

    def pin(self, buffer: HostBytes) -> None:
        """``cudaHostRegister`` the staging mapping in place: page-locked without a second buffer
        (portable, as torch's own ``_pin_memory_utils`` registers: every device's copies see it)."""
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        result = int(cudart.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, 1))
        if result != 0:
            log.warning("cudaHostRegister of %d staging bytes failed (cudaError %d): copies from pageable memory",
                        buffer.nbytes, result)
        else:
            self._registered.add(buffer.ctypes.data)

    def unpin(self, buffer: HostBytes) -> None:
        if buffer.ctypes.data in self._registered:
            self._registered.discard(buffer.ctypes.data)
            torch.cuda.cudart().cudaHostUnregister(buffer.ctypes.data)  # type: ignore[no-untyped-call]

    def _run(self, issue: Any, arrays: Sequence[DeviceArray]) -> Pending:
        stream = self._side_stream()
        producers = {id(p): p for a in arrays if (p := getattr(a, "producer", None)) is not None}
        for producer in producers.values() or [torch.cuda.current_stream(self.device)]:
            stream.wait_stream(producer)  # the bytes the training step wrote (or reads, on restore)
        with torch.cuda.stream(stream):
            issue()
            for array in arrays:  # the caching allocator must not reuse their memory before the copy ran
                if isinstance(array, TorchDeviceArray) and array.tensor.is_cuda:
                    array.tensor.record_stream(stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return _CudaPending(event)

    def to_host(self, batch: Sequence[tuple[DeviceArray, HostBytes]]) -> Pending:
        def issue() -> None:
            for array, dest in batch:
                array.copy_to_host(dest)
        return self._run(issue, [a for a, _ in batch])

    def to_device(self, batch: Sequence[tuple[HostBytes, DeviceArray, tuple[int, int]]]) -> Pending:
        def issue() -> None:
            for src, array, rows in batch:
                array.copy_from_host(src, rows)
        pending = self._run(issue, [a for _, a, _ in batch])
        return pending


def _first_choice() -> Copier:
    """The process's copier (logged once): CUDA's for the current device, else the CPU one."""
    if torch.cuda.is_available():
        chosen: Copier = _cuda_copier(torch.cuda.current_device())
        log.info("cloudckpt device copies: cuda copier (pinned staging, side stream) on %s",
                 torch.cuda.get_device_name(torch.cuda.current_device()))
        return chosen
    log.info("cloudckpt device copies: cpu copier (torch.cuda.is_available() is false)")
    return ThreadCopier()


_selection = CopierChoice(_first_choice)


_cpu_copier = ThreadCopier()
_per_device: dict[int, CudaCopier] = {}


def _cuda_copier(index: int) -> CudaCopier:
    """One copier (one side stream) per CUDA device: a stream copies only its own device's memory."""
    copier = _per_device.get(index)
    if copier is None:
        copier = _per_device.setdefault(index, CudaCopier(torch.device("cuda", index)))
    return copier


def copier_for(tensor: torch.Tensor) -> Copier | None:
    """The copier that serves ``tensor``, or ``None`` for a CPU tensor (it has a numpy view)."""
    device = tensor.device.type
    if device == "cpu":
        return _selection.current() if _selection.routes_host() else None
    chosen = _selection.current()
    if not isinstance(chosen, CudaCopier):
        return chosen  # the CPU copier (or a test's): torch's own copy_ moves any device's bytes
    if device == "cuda":
        return _cuda_copier(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
    return _cpu_copier  # another accelerator (xpu, mps): a CUDA stream cannot copy its memory


def device_array(tensor: torch.Tensor) -> TorchDeviceArray | None:
    """``tensor`` as a ``DeviceArray`` if a copier serves it (a tensor off the CPU), else ``None``
    (also for what has no flat bytes - meta, sparse, quantized: the plain path refuses those, naming the key).

    Raises:
        ValueError: a dtype with no numpy or ml_dtypes twin.
    """
    if tensor.device.type == "meta" or tensor.layout != torch.strided or tensor.is_quantized:
        return None
    copier = copier_for(tensor)
    return None if copier is None else TorchDeviceArray(tensor, copier)


def chosen_copier() -> Copier:
    """The copier device tensors of this process use (chosen once, on first need, and logged)."""
    return _selection.current()


def use_copier(copier: Copier, *, cpu_tensors: bool = False) -> AbstractContextManager[Copier]:
    """Use ``copier`` for device tensors within the block; ``cpu_tensors``: for CPU tensors too.

    The seam CI runs the device pipeline through (an instrumented ``ThreadCopier``, CPU tensors
    standing in for device ones); a benchmark uses it to compare copiers.
    """
    return _selection.use(copier, host_too=cpu_tensors)
