"""Managed checkpoint directories: ``CheckpointManager`` and ``latest_checkpoint``.

``manager`` is TensorFlow's API; ``contract`` what it takes (``ManagedCheckpoint``);
``managed_set`` what a manager keeps and its state-file form; ``ownership`` claiming,
fencing and undoing; ``directory`` read-only questions about a directory (latest committed
checkpoint, the state file) and deleting one checkpoint; ``resume`` restoring the newest
intact checkpoint past damaged ones; ``remove`` deleting one checkpoint by hand (``cloudckpt rm``).
"""

from cloudckpt.manager.contract import ManagedCheckpoint
from cloudckpt.manager.directory import delete_checkpoint, latest_checkpoint, latest_name
from cloudckpt.manager.manager import DEFAULT_LEFTOVER_MIN_AGE, CheckpointManager
from cloudckpt.manager.remove import Removal, remove_checkpoint

__all__ = ["DEFAULT_LEFTOVER_MIN_AGE", "CheckpointManager", "ManagedCheckpoint", "Removal", "delete_checkpoint",
           "latest_checkpoint", "latest_name", "remove_checkpoint"]
