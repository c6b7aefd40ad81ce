"""The host-local tier of ``CheckpointManager``: fast steps on each host and its replica peers, the bucket behind.

``config`` (``LocalTier``, replica placement by failure domain), ``holdings`` (one host's
local directory: manifests, verified objects, the owner record that fences zombies),
``replicate`` (moving objects between hosts over the coordinator), ``recover`` (agreeing on the
newest complete step and fetching what a host lacks), ``runner`` (the save and restore steps
the manager delegates), ``listing`` (what a host's directory holds: ``cloudckpt ls --local-tier``).
docs/tiers.md is the user's guide.
"""

from cloudckpt.manager.tiers.config import LocalTier, replica_holders
from cloudckpt.manager.tiers.holdings import step_of
from cloudckpt.manager.tiers.listing import LocalStep, list_local_tier
from cloudckpt.manager.tiers.runner import TierRunner

__all__ = ["LocalStep", "LocalTier", "TierRunner", "list_local_tier", "replica_holders", "step_of"]
