"""The JAX door: pytrees of ``jax.Array`` (sharded or not) saved and restored on any store.

    import cloudckpt.jax as ccjax
    ccjax.save("s3://bucket/run/step-100", tree)          # every process calls it
    tree = ccjax.restore("s3://bucket/run/step-100", like)  # like: arrays or ShapeDtypeStructs, placed
    ckpt = ccjax.PyTreeCheckpoint(tree)                     # for CheckpointManager
    manager = cloudckpt.CheckpointManager(ckpt, "s3://bucket/run", max_to_keep=3)

Only this package imports jax (``import cloudckpt`` stays light); the ``jax.Array`` leaf
kind lives with the other leaf kinds (``cloudckpt.leaves.jax_array``) and never imports
jax itself. See docs/jax.md.
"""

from cloudckpt.jax.checkpoint import PyTreeCheckpoint, restore, save
from cloudckpt.jax.coordinator import JaxCoordinator, jax_coordinator

__all__ = ["JaxCoordinator", "PyTreeCheckpoint", "jax_coordinator", "restore", "save"]
