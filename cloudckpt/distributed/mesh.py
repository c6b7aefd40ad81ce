"""``Mesh`` and ``Layout``: where the shards of a global array live (TensorFlow DTensor's names).

A mesh is a grid of devices with named dimensions (``Mesh(["x", "y"], [2, 2])``); every
device belongs to one process (host) of the job. A layout says, per dimension of an
array, which mesh dimension splits it (or ``UNSHARDED``). From the two follows the box -
start and extent in the global array - of the shard every device holds; devices that
differ only along mesh dimensions the layout does not use hold the same box (replicas).

Why this module knows nothing about torch or storage: the shard arithmetic is shared by
save (which boxes exist, who writes each replica once), restore (which byte ranges a
host needs) and the torch ``DTensor`` bridge, and must give all three the same answer.

Uneven splits follow ``torch.chunk`` (and ``torch.distributed.tensor.Shard``): a
dimension of size ``n`` over ``k`` devices gets pieces of ``ceil(n / k)``, the last ones
shorter or empty, so a ``DTensor`` and a ``Layout`` describe the same shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cloudckpt.coordination import Coordinator, default_coordinator

#: A ``Layout`` sharding spec: this array dimension is not split (TensorFlow's ``UNSHARDED``).
UNSHARDED = "unsharded"
#: TensorFlow's spec for "any mesh dimension" in some APIs; accepted as a synonym of ``UNSHARDED``.
MATCH = "match"

Box = tuple[tuple[int, ...], tuple[int, ...]]


def split_extent(size: int, parts: int, index: int) -> tuple[int, int]:
    """``(offset, length)`` of piece ``index`` of ``parts`` of a dimension of ``size`` (torch.chunk rule)."""
    piece = -(-size // parts) if parts else size
    offset = min(index * piece, size)
    return offset, min(piece, size - offset)


class Mesh:
    """Named dimensions over the job's devices (``tf.experimental.dtensor.Mesh``).

    Args:
        dim_names: one unique name per mesh dimension (``["batch", "model"]``).
        shape: devices along each dimension; the mesh has ``prod(shape)`` devices,
            numbered in C order of their coordinates.
        coordinator: how the processes of the job talk (``TorchCoordinator``); default:
            a ``TorchCoordinator`` if ``torch.distributed`` is initialised with more than
            one process, else the single-process ``LocalCoordinator``. Every process must
            construct its meshes in the same order (the first one may create the
            checkpoint process group, a collective call).
        device_processes: the rank owning each device (flat, C order). Default: devices
            split into equal contiguous blocks, ``world_size`` blocks (so one process may
            hold several devices' shards - how a single process can hold a 2x2 mesh).

    Raises:
        ValueError: names not unique or not strings, a non-positive dimension, or
            ``device_processes`` of the wrong length / naming ranks outside the job.
    """

    __slots__ = ("_coordinator", "device_processes", "dim_names", "shape")

    def __init__(self, dim_names: Sequence[str], shape: Sequence[int], *, coordinator: Coordinator | None = None,
                 device_processes: Sequence[int] | None = None) -> None:
        names = tuple(dim_names)
        dims = tuple(shape)
        if not names or any(not isinstance(n, str) or not n or n in (UNSHARDED, MATCH) for n in names):
            raise ValueError(f"Mesh dim_names must be non-empty strings other than {UNSHARDED!r}, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"Mesh dim_names must be unique, got {names!r}")
        if len(dims) != len(names) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"Mesh shape must be {len(names)} positive ints (one per name in {names!r}), got {dims!r}")
        if coordinator is None:
            coordinator = default_coordinator()
        size = math.prod(dims)
        world = coordinator.world_size
        if device_processes is None:
            if size % world:
                raise ValueError(f"a Mesh of {size} devices cannot be split evenly over {world} processes; "
                                 f"pass device_processes to say which process owns each device")
            per = size // world
            owners = tuple(d // per for d in range(size))
        else:
            owners = tuple(device_processes)
            if len(owners) != size or any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world
                                          for r in owners):
                raise ValueError(f"Mesh device_processes must list {size} ranks in [0, {world}), got {owners!r}")
        self.dim_names = names
        self.shape = dims
        self.device_processes = owners
        self._coordinator = coordinator

    @classmethod
    def from_device_mesh(cls, device_mesh: Any, *, coordinator: Coordinator | None = None) -> Mesh:
        """The ``Mesh`` of a ``torch.distributed.device_mesh.DeviceMesh`` (same names, shape, ranks).

        A ``DeviceMesh`` without dimension names gets ``dim0``, ``dim1``, ...
        """
        ranks = [int(r) for r in device_mesh.mesh.flatten().tolist()]
        shape = tuple(int(n) for n in device_mesh.mesh.shape)
        names = device_mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(len(shape)))
        return cls(tuple(names), shape, coordinator=coordinator, device_processes=ranks)

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator the job's checkpoints use (shared by every mesh of a process)."""
        return self._coordinator

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def dim_index(self, name: str) -> int:
        """The position of mesh dimension ``name``; ``ValueError`` naming the known ones otherwise."""
        try:
            return self.dim_names.index(name)
        except ValueError:
            raise ValueError(f"{name!r} is not a dimension of mesh {self.dim_names!r}") from None

    def coordinates(self, device: int) -> tuple[int, ...]:
        """The mesh coordinates of flat device ``device`` (C order)."""
        coords = []
        for n in reversed(self.shape):
            coords.append(device % n)
            device //= n
        return tuple(reversed(coords))

    def local_devices(self) -> tuple[int, ...]:
        """The devices this process owns, in increasing order."""
        rank = self._coordinator.rank
        return tuple(d for d, owner in enumerate(self.device_processes) if owner == rank)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Mesh) and self.dim_names == other.dim_names and self.shape == other.shape
                and self.device_processes == other.device_processes)

    def __hash__(self) -> int:
        return hash((self.dim_names, self.shape, self.device_processes))

    def __repr__(self) -> str:
        dims = ", ".join(f"{n}={s}" for n, s in zip(self.dim_names, self.shape, strict=True))
        return f"Mesh({dims}, processes={len(set(self.device_processes))})"


class Layout:
    """How an array is split over a mesh (``tf.experimental.dtensor.Layout``).

    Args:
        sharding_specs: one entry per array dimension: a mesh dimension name (split
            along it) or ``UNSHARDED``. A mesh dimension may split at most one array
            dimension; mesh dimensions not named replicate the array along them.
        mesh: the mesh.

    Raises:
        ValueError: an unknown mesh dimension, or one used twice (naming it).
    """

    __slots__ = ("_split", "mesh", "sharding_specs")

    def __init__(self, sharding_specs: Sequence[str], mesh: Mesh) -> None:
        specs = tuple(sharding_specs)
        if not isinstance(mesh, Mesh):
            raise ValueError(f"Layout mesh must be a cloudckpt.Mesh, got {type(mesh).__name__}")
        split: list[tuple[int, ...]] = []
        used: set[str] = set()
        for i, spec in enumerate(specs):
            if not isinstance(spec, str):
                raise ValueError(f"Layout sharding_specs[{i}] must be a mesh dimension name or UNSHARDED, "
                                 f"got {spec!r}")
            if spec in (UNSHARDED, MATCH):
                split.append(())
                continue
            if spec in used:
                raise ValueError(f"Layout sharding_specs {specs!r}: mesh dimension {spec!r} splits two array "
                                 f"dimensions")
            used.add(spec)
            split.append((mesh.dim_index(spec),))
        self.sharding_specs = specs
        self.mesh = mesh
        self._split = tuple(split)

    @classmethod
    def replicated(cls, mesh: Mesh, rank: int) -> Layout:
        """Every device holds the whole array."""
        return cls([UNSHARDED] * rank, mesh)

    @classmethod
    def batch_sharded(cls, mesh: Mesh, batch_dim: str, rank: int, axis: int = 0) -> Layout:
        """Split dimension ``axis`` over mesh dimension ``batch_dim``, replicate the rest."""
        specs = [UNSHARDED] * rank
        specs[axis] = batch_dim
        return cls(specs, mesh)

    @classmethod
    def from_splits(cls, mesh: Mesh, splits: Sequence[Sequence[int]]) -> Layout:
        """A layout where array dimension ``i`` is split by the mesh dimensions ``splits[i]``, in order.

        What a torch ``DTensor`` can express beyond TensorFlow's layouts (one array
        dimension split by several mesh dimensions, ``[Shard(0), Shard(0)]``); its
        ``sharding_specs`` name only the first mesh dimension of such a split.
        """
        layout = cls.__new__(cls)
        layout.mesh = mesh
        layout._split = tuple(tuple(s) for s in splits)
        layout.sharding_specs = tuple(mesh.dim_names[s[0]] if s else UNSHARDED for s in layout._split)
        return layout

    @property
    def rank(self) -> int:
        return len(self._split)

    def is_fully_replicated(self) -> bool:
        return not any(self._split)

    def box(self, global_shape: Sequence[int], device: int) -> Box:
        """``(start, shape)`` of the shard device ``device`` holds of an array of ``global_shape``."""
        shape = tuple(global_shape)
        if len(shape) != self.rank:
            raise ValueError(f"an array of shape {shape} does not fit layout {self!r} of rank {self.rank}")
        coords = self.mesh.coordinates(device)
        starts: list[int] = []
        extents: list[int] = []
        for size, mesh_dims in zip(shape, self._split, strict=True):
            start, extent = 0, size
            for m in mesh_dims:
                offset, extent = split_extent(extent, self.mesh.shape[m], coords[m])
                start += offset
            starts.append(start)
            extents.append(extent)
        return tuple(starts), tuple(extents)

    def local_boxes(self, global_shape: Sequence[int]) -> list[tuple[int, Box]]:
        """``(device, box)`` for every device of this process."""
        return [(d, self.box(global_shape, d)) for d in self.mesh.local_devices()]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.mesh == other.mesh and self._split == other._split

    def __hash__(self) -> int:
        return hash((self.mesh, self._split))

    def __repr__(self) -> str:
        return f"Layout({list(self.sharding_specs)!r}, {self.mesh!r})"
