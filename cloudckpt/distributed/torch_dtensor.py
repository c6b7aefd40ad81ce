"""torch ``DTensor`` as a sharded array: its box from ``device_mesh`` + ``placements``, its bytes from ``to_local()``.

Imported only when a ``DTensor`` is met (it imports torch). A ``DTensor`` inside a
``state_dict`` is therefore saved shard by shard and restored in place, whatever layout
the checkpoint was written with.

The box follows torch's own rule for ``Shard(d)`` (``torch.chunk``: pieces of
``ceil(n / k)``, applied mesh dimension by mesh dimension), and is checked against the
local tensor's shape so a placement this module does not understand fails loudly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from torch.distributed.tensor import DTensor, Replicate, Shard

from cloudckpt.adapters import torch as torch_adapter
from cloudckpt.adapters import torch_device
from cloudckpt.distributed.mesh import split_extent
from cloudckpt.format import ArrayPyType
from cloudckpt.leaves.copier import DeviceArray
from cloudckpt.object_graph import RestoreTarget


def dtensor_box(tensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, shape)`` of this rank's shard of ``tensor`` in its global shape.

    Raises:
        ValueError: ``Partial`` (unreduced) or other placements that are not a plain box
            of the global array, or a rank outside the tensor's mesh.
    """
    mesh = tensor.device_mesh
    coords = mesh.get_coordinate()
    if coords is None:
        raise ValueError("this rank is not part of the DTensor's device mesh")
    starts = [0] * tensor.ndim
    extents = list(tensor.shape)
    for mesh_dim, placement in enumerate(tensor.placements):
        if type(placement) is Shard:
            d = placement.dim
            offset, extents[d] = split_extent(extents[d], mesh.size(mesh_dim), coords[mesh_dim])
            starts[d] += offset
        elif not isinstance(placement, Replicate):
            raise ValueError(f"DTensor placement {placement!r} cannot be checkpointed as shards (reduce "
                             f"Partial values, or redistribute to Shard/Replicate first)")
    local = tensor.to_local()
    if tuple(local.shape) != tuple(extents):
        raise ValueError(f"DTensor local shape {tuple(local.shape)} differs from the {tuple(extents)} its placements "
                         f"{tensor.placements} imply")
    return tuple(starts), tuple(extents)


class DTensorView:
    """The ``ShardedValue`` of one ``DTensor`` (see ``cloudckpt.object_graph.ShardedValue``)."""

    __slots__ = ("_tensor",)

    def __init__(self, tensor: DTensor) -> None:
        self._tensor = tensor

    @property
    def global_shape(self) -> tuple[int, ...]:
        return tuple(self._tensor.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return torch_adapter.tensor_meta(self._tensor.to_local())[1]

    @property
    def pytype(self) -> ArrayPyType:
        return "tensor"

    def save_shards(self) -> list[tuple[tuple[int, ...], NDArray[Any] | DeviceArray]]:
        """The local shard: a numpy view on the CPU, a ``DeviceArray`` on a GPU (copied in batches)."""
        start, _ = dtensor_box(self._tensor)
        shard = self._tensor.to_local()
        device = torch_device.device_array(shard)
        return [(start, device if device is not None else torch_adapter.tensor_to_numpy(shard))]

    def restore_targets(self) -> list[RestoreTarget]:
        start, extent = dtensor_box(self._tensor)
        local = self._tensor.to_local()
        direct: NDArray[Any] | DeviceArray | None = torch_device.device_array(local)
        if direct is None:
            direct = torch_adapter.writable_view(local)

        def assign(values: NDArray[Any]) -> None:
            if direct is None:
                torch_adapter.copy_into(local, values)

        return [(start, extent, direct, assign)]
