"""Managed checkpoint directories: ``CheckpointManager`` and ``latest_checkpoint``.

``manager`` is TensorFlow's API; ``contract`` what it takes (``ManagedCheckpoint``);
``managed_set`` what a manager keeps and its state-file form; ``ownership`` claiming,
fencing and undoing; ``directory`` read-only questions about a directory (latest committed
checkpoint, the state file) and deleting one checkpoint; ``resume`` restoring the newest
intact checkpoint past damaged ones; ``remove`` deleting one checkpoint by hand (``cloudckpt rm``);
``retention`` the policies that decide what a manager keeps (``LatestN``, ``EveryNHours``,
``BestN``, ``AnyOf``; re-exported here, their public path); ``cleanup`` finding and removing
what crashed saves left behind; ``preemption`` turning SIGTERM into a save at the next step;
``tiers`` the host-local tier (``LocalTier``) in front of the bucket.
"""

from cloudckpt.manager.contract import ManagedCheckpoint
from cloudckpt.manager.directory import delete_checkpoint, latest_checkpoint, latest_name
from cloudckpt.manager.manager import DEFAULT_LEFTOVER_MIN_AGE, CheckpointManager
from cloudckpt.manager.remove import Removal, remove_checkpoint
from cloudckpt.manager.retention import AnyOf, BestN, EveryNHours, LatestN, RetentionPolicy
from cloudckpt.manager.tiers import LocalTier

__all__ = ["DEFAULT_LEFTOVER_MIN_AGE", "AnyOf", "BestN", "CheckpointManager", "EveryNHours", "LatestN", "LocalTier",
           "ManagedCheckpoint", "Removal", "RetentionPolicy", "delete_checkpoint", "latest_checkpoint", "latest_name",
           "remove_checkpoint"]
