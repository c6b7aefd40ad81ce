"""Many hosts: meshes, layouts, sharded arrays, the coordinator protocol and ``DTensorCheckpoint``.

See docs/distributed.md. Importing this package stays light (no torch): torch is
imported only by ``TorchCoordinator`` and when a ``DTensor`` is met.
"""

from cloudckpt import object_graph as _graph
from cloudckpt.coordination import (
    Coordinator,
    LocalCoordinator,
    TorchCoordinator,
    default_coordinator,
    set_default_coordinator,
)
from cloudckpt.distributed.dtensor_checkpoint import DTensorCheckpoint
from cloudckpt.distributed.mesh import UNSHARDED, Layout, Mesh
from cloudckpt.distributed.sharded import ShardedArray, view
from cloudckpt.errors import CoordinationError, DistributedSaveError

_graph.register_sharded(view)

__all__ = [
    "UNSHARDED",
    "CoordinationError",
    "Coordinator",
    "DTensorCheckpoint",
    "DistributedSaveError",
    "Layout",
    "LocalCoordinator",
    "Mesh",
    "ShardedArray",
    "TorchCoordinator",
    "default_coordinator",
    "set_default_coordinator",
]
