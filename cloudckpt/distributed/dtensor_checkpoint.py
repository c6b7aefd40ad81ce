"""``DTensorCheckpoint``: a ``Checkpoint`` whose saves run on every host of a mesh together.

TensorFlow's ``tf.experimental.dtensor.DTensorCheckpoint(mesh, root=None, **kwargs)``.
Every process of the job constructs it with the same objects (each holding its own
shards) and calls ``save``/``write``/``restore``/``read`` together; each host then writes only
the shards it was assigned, in parallel, and one host commits the index. A restore is
collective too, but only for the index: rank 0 (or the io host) reads and validates it once
and broadcasts it; each host then reads just the byte ranges its own shards need.
"""

from __future__ import annotations

from typing import Any

from cloudckpt.checkpoint import Checkpoint
from cloudckpt.distributed.mesh import Mesh
from cloudckpt.trackable import Trackable


class DTensorCheckpoint(Checkpoint):
    """A ``Checkpoint`` of state sharded over ``mesh`` (``ShardedArray``, torch ``DTensor``, anything else replicated).

    Args:
        mesh: the job's mesh; its coordinator runs every save's collectives.
        root: optional root ``Trackable`` (as for ``Checkpoint``).
        **kwargs: the objects to checkpoint, by name.

    Non-sharded values (numpy arrays, tensors, scalars, ``save_counter``) are taken to be
    replicated: every host holds them, and they are written once. Every host must hold
    the same tree of objects (key paths, dtypes, global shapes); a difference fails the
    save before any byte is written, naming the key.
    """

    _mesh: Mesh

    def __init__(self, mesh: Mesh, root: Trackable | None = None, **kwargs: Any) -> None:
        if not isinstance(mesh, Mesh):
            raise ValueError(f"DTensorCheckpoint mesh must be a cloudckpt.Mesh, got {type(mesh).__name__}")
        super().__init__(root, **kwargs)
        object.__setattr__(self, "_mesh", mesh)
        object.__setattr__(self, "_coordinator", mesh.coordinator)

    @property
    def mesh(self) -> Mesh:
        return self._mesh
