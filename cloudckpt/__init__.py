"""cloudckpt: TensorFlow's checkpoint API for numpy and PyTorch state, on S3, GCS and local disk.

The package imports light: cloud SDKs and torch load only when a URL or an object needs them.
"""

from cloudckpt import errors
from cloudckpt import orbax as orbax  # registers the Orbax layout (tensorstore loads only when one is opened)
from cloudckpt import tfbundle as tfbundle  # registers the TensorFlow reader with cloudckpt.format.sniff
from cloudckpt.checkpoint import Checkpoint
from cloudckpt.distributed import UNSHARDED, DTensorCheckpoint, Layout, Mesh, ShardedArray
from cloudckpt.errors import (
    AfterCommitError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ChecksumError,
    CloudCkptError,
    ConcurrentWriterError,
    NotFoundError,
    SaveError,
)
from cloudckpt.format.sniff import ForeignCheckpoint as _ForeignCheckpoint
from cloudckpt.format.sniff import IndexFormat as _IndexFormat
from cloudckpt.format.sniff import register_directory_reader as _register_directory_reader
from cloudckpt.manager import CheckpointManager, latest_checkpoint, remove_checkpoint
from cloudckpt.manager.preemption import PreemptionCheckpointHandler
from cloudckpt.manager.retention import AnyOf, BestN, EveryNHours, LatestN
from cloudckpt.manager.tiers import LocalTier
from cloudckpt.options import CheckpointOptions
from cloudckpt.restoring.checkpoint_reader import CheckpointReader, list_variables, load_checkpoint, load_variable
from cloudckpt.saving.async_save import SaveStats
from cloudckpt.storage import (
    Location,
    RetryPolicy,
    Storage,
    TransferConfig,
    open_storage,
    register_storage,
    unregister_storage,
)
from cloudckpt.storage.base import GiB, MiB
from cloudckpt.trackable import Trackable, Variable


def _open_torch_dcp(storage: Storage, name: str) -> _ForeignCheckpoint:
    """torch DCP's own layout (``<name>/.metadata``): the reader (and torch) is imported only when one is opened."""
    from cloudckpt.dcp.layout import open_layout

    return open_layout(storage, name)


_register_directory_reader(_IndexFormat.TORCH_DCP, ".metadata", _open_torch_dcp)

__version__ = "0.1.0"

__all__ = [
    "UNSHARDED",
    "AfterCommitError",
    "AnyOf",
    "BestN",
    "Checkpoint",
    "CheckpointFormatError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointOptions",
    "CheckpointReader",
    "ChecksumError",
    "CloudCkptError",
    "ConcurrentWriterError",
    "DTensorCheckpoint",
    "EveryNHours",
    "GiB",
    "LatestN",
    "Layout",
    "LocalTier",
    "Location",
    "Mesh",
    "MiB",
    "NotFoundError",
    "PreemptionCheckpointHandler",
    "RetryPolicy",
    "SaveError",
    "SaveStats",
    "ShardedArray",
    "Storage",
    "Trackable",
    "TransferConfig",
    "Variable",
    "__version__",
    "errors",
    "latest_checkpoint",
    "list_variables",
    "load_checkpoint",
    "load_variable",
    "open_storage",
    "register_storage",
    "remove_checkpoint",
    "unregister_storage",
]

