"""``JaxCoordinator``: the coordinator protocol on JAX's own distributed runtime.

It lives in ``cloudckpt.coordination.jax_kv`` (below this package, never importing jax), so
that ``cloudckpt.coordination.default_coordinator()`` can hand it to a plain ``Checkpoint``
in a multi-process JAX job; this is its public path.
"""

from __future__ import annotations

from cloudckpt.coordination.jax_kv import PIECE_BYTES, JaxCoordinator, in_jax_job, jax_coordinator

__all__ = ["PIECE_BYTES", "JaxCoordinator", "in_jax_job", "jax_coordinator"]
