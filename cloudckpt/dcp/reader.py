"""``StorageReader``: ``torch.distributed.checkpoint.load`` from a cloudckpt checkpoint.

Every rank reads the (guarded, validated) index once in ``read_metadata`` - or is handed it,
read once for the whole job (``DCPCheckpoint.restore``) - and hands DCP its ``Metadata``
(``cloudckpt.dcp.metadata``); DCP's planner then says which box of which stored chunk goes
into which box of which destination tensor. ``read_data`` turns those
items into ``ReadTarget``s and reads them all with one ``cloudckpt.restoring.array_reads.read_arrays``
call: parallel ranged GETs, small neighbours coalesced, every byte CRC32C-verified (whole
chunks, or the 1 MiB blocks around the part of a chunk a resharding load needs).

Zero extra copies where the layout allows: a destination box that is contiguous CPU
memory of the stored dtype (a whole tensor, a ``Shard(0)`` row block) is read straight into
the tensor's own memory. A device (CUDA) destination of the stored dtype is filled as a
``Checkpoint`` restore fills one (``restoring.device_reads``: rounds of bounce reads its copier
copies in). Otherwise (a column block of a resharded load, another dtype) the bytes land in a
buffer and are copied in with ``Tensor.copy_`` - as DCP's own readers do for every item.
Byte items are handed to DCP's ``planner.load_bytes``, which unpickles them
(``torch.load(weights_only=False)``); cloudckpt itself never does.

Untrusted sizes: a tensor box lands in memory the planner sized (the destination tensor's),
but a byte item's buffer is sized by its index entry alone, so a large one is allocated only
after HEAD has shown its data object really holds those bytes (``reader.backed_buffer``, the
check cloudckpt's own restore makes), and a read that runs short names the item, its bytes
and the object's real size.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader as DCPStorageReader
from torch.futures import Future as TorchFuture

from cloudckpt.adapters import torch as torch_adapter
from cloudckpt.adapters.torch_device import device_array
from cloudckpt.dcp.metadata import decode_metadata, fqn_path, saved_counter
from cloudckpt.dcp.paths import Addressed, CheckpointId
from cloudckpt.errors import CheckpointFormatError, CheckpointMismatchError
from cloudckpt.format import ArrayEntry, CheckpointIndex, Chunk, parse_dtype
from cloudckpt.format.index_fetch import load_index
from cloudckpt.restoring.array_reads import read_arrays
from cloudckpt.restoring.buffers import ObjectSizes, ReadTarget, backed_buffer, new_buffer
from cloudckpt.restoring.device_reads import DeviceTarget, read_to_device
from cloudckpt.storage import Location, Storage


class StorageReader(Addressed, DCPStorageReader):
    """Where ``dcp.load`` reads from: a cloudckpt checkpoint (written through ``StorageWriter``).

    Args:
        checkpoint_id: the checkpoint path, a ``Location``, or with ``storage`` a name in
            it; may instead be given to ``dcp.load(checkpoint_id=...)``.
        storage: an already-open ``Storage`` bare checkpoint names are resolved in.
        index: the checkpoint's index, already read - a caller that knows every rank loads
            together (``DCPCheckpoint.restore``) reads it once and broadcasts it
            (``relay.shared_index``). Without it each rank reads the index itself: DCP calls
            ``read_metadata`` on every rank, and a broadcast there would hang a
            ``dcp.load(..., no_dist=True)`` on one rank of a running job.

    Loading needs no coordination of its own: each rank reads only the bytes its plan needs.
    """

    def __init__(self, checkpoint_id: CheckpointId | None = None, *, storage: Storage | None = None,
                 index: CheckpointIndex | None = None) -> None:
        super().__init__()
        self._address(checkpoint_id, storage)
        self._shared = index  # for the checkpoint given here; a reset to another one drops it
        self._index: CheckpointIndex | None = index
        self.load_id = uuid.uuid4().hex
        #: Why the last ``read_metadata`` failed (``CheckpointNotFoundError``, ...), or ``None``.
        self.metadata_error: Exception | None = None

    def reset(self, checkpoint_id: CheckpointId | None = None) -> None:
        self._readdress(checkpoint_id)
        if checkpoint_id is not None:
            self._shared = None
        self._index = self._shared
        self.load_id = uuid.uuid4().hex

    @property
    def save_counter(self) -> int | None:
        """The ``save_counter`` a ``DCPCheckpoint`` recorded in the checkpoint read, if any."""
        if self._index is None or self._location is None:
            return None
        return saved_counter(self._index, self._location.url)

    def _loaded(self) -> CheckpointIndex:
        if self._index is None:
            location = self._where()
            self._index = load_index(location.storage, location.name)
        return self._index

    # ------------------------------------------------------------------ DCP's protocol
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, decoded from its index (never unpickled).

        Raises:
            CheckpointNotFoundError: nothing committed at the path.
            CheckpointFormatError: not a checkpoint written through DCP, or malformed.
        """
        location = self._where()
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata files: there are none
            raise CheckpointFormatError(f"{location.url} has one index for every rank; there is no per-rank metadata")
        self._index = self._shared
        self.metadata_error = None
        try:
            metadata = decode_metadata(self._loaded(), location.url)
        except Exception as exc:
            self.metadata_error = exc  # DCP reports it only as text inside an AssertionError of its own
            raise
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._loaded()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> TorchFuture[None]:
        location = self._where()
        index = self._loaded()
        targets: list[ReadTarget] = []
        on_device: list[DeviceTarget] = []
        copies: list[Callable[[], None]] = []
        tensors: list[tuple[ReadItem, torch.Tensor]] = []
        byte_items: list[tuple[ReadItem, NDArray[np.uint8]]] = []
        chunk_at: dict[str, dict[tuple[int, ...], Chunk]] = {}
        sizes = ObjectSizes(location.storage)
        for item in plan.items:
            path = fqn_path(item.storage_index.fqn)
            entry = index.entries.get(path)
            if not isinstance(entry, ArrayEntry):
                raise CheckpointMismatchError(f"{location.url} has no item {item.storage_index.fqn!r}")
            if item.type == LoadItemType.BYTE_IO:
                if entry.pytype != "bytes":
                    raise CheckpointMismatchError(f"{item.storage_index.fqn!r} in {location.url} is a tensor, "
                                                  f"not a byte item")
                buffer = backed_buffer(index, path, entry, sizes)  # its size is the index's word alone
                targets.append(ReadTarget(path, entry, buffer, live=False))
                byte_items.append((item, buffer))
                continue
            start, lengths = self._box(location, path, entry, item, chunk_at)
            dest = planner.resolve_tensor(item).detach()
            if tuple(dest.shape) != lengths:
                raise CheckpointMismatchError(
                    f"{item.storage_index.fqn!r}: the planner's destination has shape {tuple(dest.shape)}, the "
                    f"item {lengths}")
            view = torch_adapter.writable_view(dest)
            device = device_array(dest)  # a CUDA tensor: bounce reads its copier copies in, as Checkpoint's restore
            if device is not None and device.dtype == parse_dtype(entry.dtype):
                on_device.append(DeviceTarget(path, entry, device, start))
            elif view is not None and view.dtype == parse_dtype(entry.dtype):
                targets.append(ReadTarget(path, entry, view, live=True, start=start))
            else:
                buffer = new_buffer(entry, lengths)
                targets.append(ReadTarget(path, entry, buffer, live=False, start=start))
                copies.append(_copier(dest, buffer))
            tensors.append((item, dest))
        read_arrays(location.storage, index, targets)
        read_to_device(location.storage, index, on_device)
        for copy in copies:
            copy()
        for item, dest in tensors:
            planner.commit_tensor(item, dest)
        for item, buffer in byte_items:
            planner.load_bytes(item, io.BytesIO(buffer.tobytes()))
        future: TorchFuture[None] = TorchFuture()
        future.set_result(None)
        return future

    @staticmethod
    def _box(location: Location, path: str, entry: ArrayEntry, item: ReadItem,
             chunk_at: dict[str, dict[tuple[int, ...], Chunk]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Where ``item``'s box lies in the global tensor: inside the stored chunk it names."""
        by_start = chunk_at.get(path)
        if by_start is None:
            by_start = chunk_at[path] = {c.start: c for c in entry.chunks}
        offset = tuple(int(o) for o in (item.storage_index.offset or ()))
        chunk = by_start.get(offset)
        inner = tuple(int(o) for o in item.storage_offsets)
        lengths = tuple(int(n) for n in item.lengths)
        if chunk is None or len(inner) != len(chunk.shape) or len(lengths) != len(chunk.shape) or any(
                o < 0 or n < 0 or o + n > s for o, n, s in zip(inner, lengths, chunk.shape, strict=True)):
            raise CheckpointMismatchError(
                f"{item.storage_index.fqn!r}: DCP asks for the box at {inner} of shape {lengths} of the chunk at "
                f"{offset}, which {location.url} does not hold")
        return tuple(c + o for c, o in zip(chunk.start, inner, strict=True)), lengths


def _copier(dest: torch.Tensor, buffer: NDArray[Any]) -> Callable[[], None]:
    def copy() -> None:
        with torch.no_grad():
            dest.copy_(torch_adapter.numpy_to_tensor(buffer))
    return copy
