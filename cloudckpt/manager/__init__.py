"""Managed checkpoint directories: ``CheckpointManager`` and ``latest_checkpoint``.

``manager`` is TensorFlow's API; ``managed_set`` what a manager keeps and its state-file
form; ``ownership`` claiming, fencing and undoing; ``directory`` read-only questions about
a directory (latest committed checkpoint, the state file) and deleting one checkpoint.
"""

from cloudckpt.manager.directory import delete_checkpoint, latest_name
from cloudckpt.manager.manager import DEFAULT_LEFTOVER_MIN_AGE, CheckpointManager, ManagedCheckpoint, latest_checkpoint

__all__ = ["DEFAULT_LEFTOVER_MIN_AGE", "CheckpointManager", "ManagedCheckpoint", "delete_checkpoint",
           "latest_checkpoint", "latest_name"]
