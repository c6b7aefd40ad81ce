"""``ShardedArray``: this process's shards of a global array, laid out over a ``Mesh``.

The numpy counterpart of a DTensor: it knows the global shape, the dtype and the
``Layout``, and holds one numpy array per local device (devices that hold the same box
get separate arrays, as separate devices would). A checkpoint saves each distinct box
once - across hosts too - and restores each local shard by reading only the byte ranges
of its box, whatever layout the checkpoint was written with.

torch ``DTensor`` objects are recognised as they are (see ``torch_dtensor``); both are
registered with the graph walker by ``view``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from cloudckpt.distributed.mesh import Box, Layout
from cloudckpt.format import ArrayPyType, storage_dtype
from cloudckpt.object_graph import RestoreTarget, ShardedValue


class ShardedArray:
    """A global array of which this process holds the shards of its local devices.

    Args:
        shape: the global shape.
        dtype: the element type.
        layout: how the array is split over ``layout.mesh``.
        shards: one array per local device (``layout.mesh.local_devices()`` order), each of
            its box's shape; default: zero-filled.

    Raises:
        ValueError: a layout of another rank, or a shard of the wrong shape or dtype
            (naming the device).
    """

    __slots__ = ("_dtype", "_layout", "_shape", "_shards")

    def __init__(self, shape: Sequence[int], dtype: DTypeLike, layout: Layout,
                 shards: Sequence[NDArray[Any]] | None = None) -> None:
        self._shape = tuple(int(n) for n in shape)
        self._dtype = np.dtype(dtype)
        self._layout = layout
        boxes = layout.local_boxes(self._shape)
        if shards is None:
            shards = [np.zeros(box[1], dtype=self._dtype) for _, box in boxes]
        if len(shards) != len(boxes):
            raise ValueError(f"ShardedArray needs {len(boxes)} shards (one per local device of {layout.mesh!r}), "
                             f"got {len(shards)}")
        arrays = []
        for (device, (_, extent)), shard in zip(boxes, shards, strict=True):
            array = np.asarray(shard)
            if array.shape != extent or array.dtype != self._dtype:
                raise ValueError(f"ShardedArray shard of device {device} must have shape {extent} and dtype "
                                 f"{self._dtype}, got {array.shape} {array.dtype}")
            arrays.append(array)
        self._shards = tuple(arrays)

    @classmethod
    def from_global(cls, array: NDArray[Any], layout: Layout) -> ShardedArray:
        """This process's shards of ``array`` (copies: each device owns its memory)."""
        array = np.asarray(array)
        shards = [np.array(array[_slices(box)], order="C", copy=True) for _, box in layout.local_boxes(array.shape)]
        return cls(array.shape, array.dtype, layout, shards)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def global_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def pytype(self) -> ArrayPyType:
        return "ndarray"

    @property
    def local_shards(self) -> tuple[NDArray[Any], ...]:
        """One array per local device, in ``layout.mesh.local_devices()`` order."""
        return self._shards

    def local_boxes(self) -> list[Box]:
        """``(start, shape)`` of each local shard in the global array."""
        return [box for _, box in self._layout.local_boxes(self._shape)]

    def to_numpy(self) -> NDArray[Any]:
        """The global array, if this process's shards cover all of it (else ``ValueError``)."""
        out = np.empty(self._shape, dtype=self._dtype)
        covered = np.zeros(self._shape, dtype=bool)
        for box, shard in zip(self.local_boxes(), self._shards, strict=True):
            out[_slices(box)] = shard
            covered[_slices(box)] = True
        if not covered.all():
            raise ValueError(f"this process holds only part of the sharded array of shape {self._shape} "
                             f"({int(covered.sum())} of {math.prod(self._shape)} elements)")
        return out

    # ----------------------------------------------------------- ShardedValue protocol
    def save_shards(self) -> list[tuple[tuple[int, ...], NDArray[Any]]]:
        out = []
        for (start, _), shard in zip(self.local_boxes(), self._shards, strict=True):
            out.append((start, shard))
        return out

    def restore_targets(self) -> list[RestoreTarget]:
        out: list[RestoreTarget] = []
        for (start, extent), shard in zip(self.local_boxes(), self._shards, strict=True):
            direct = shard.flags.c_contiguous and shard.flags.writeable and shard.dtype == storage_dtype(shard.dtype)
            out.append((start, extent, shard if direct else None, _copier(shard)))
        return out

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self._shape}, dtype={self._dtype}, layout={self._layout!r})"


def _copier(dest: NDArray[Any]) -> Callable[[NDArray[Any]], None]:
    def assign(values: NDArray[Any]) -> None:
        if values is not dest:
            np.copyto(dest, values)
    return assign


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(box[0], box[1], strict=True))


def view(value: object) -> ShardedValue | None:
    """The ``ShardedValue`` of a ``ShardedArray`` or torch ``DTensor``; ``None`` for anything else."""
    if isinstance(value, ShardedArray):
        return value
    cls = type(value)
    if cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed"):
        from cloudckpt.distributed.torch_dtensor import DTensorView
        return DTensorView(value)  # type: ignore[arg-type]
    return None
