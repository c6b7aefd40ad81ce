"""Leaf kinds: each kind of leaf value is one ``LeafKind`` object, tried in registry order.

Internal: not a public path (docs/architecture.md lists those), so it may move between releases.

The graph walk (``cloudckpt.object_graph``) and the restore plan (``cloudckpt.restoring.assign``) ask the
first kind that claims a value (``kind_of``) for its metadata and bytes, how to restore
into it and how to build it fresh; they never switch on the kind. Adding a kind (JAX
arrays, CUDA tensors) is one new module with a ``LeafKind`` subclass plus one
``register`` call - here for the built-in kinds, in the integration's own module
otherwise. See ``base`` for the protocol and the device-copier seam.

Built-in order (first match wins, as classification always went): sharded arrays,
``Variable``, numpy arrays, numpy scalars, Python values, torch tensors, opaque bytes
(``bytes`` values, and the ``bytes`` entries DCP writes), then ``jax.Array`` (jax is
never imported here).
"""

from cloudckpt.leaves.base import (
    ArrayLeaf,
    Builder,
    Collected,
    LeafEntry,
    LeafKind,
    LeafPlan,
    Setter,
    ShardedLeaf,
)
from cloudckpt.leaves.jax_array import JAX_ARRAY
from cloudckpt.leaves.ndarray import NDARRAY
from cloudckpt.leaves.opaque import OPAQUE_BYTES
from cloudckpt.leaves.registry import builder_for, kind_of, register, registered, unregister
from cloudckpt.leaves.scalar import NUMPY_SCALAR
from cloudckpt.leaves.sharded import SHARDED
from cloudckpt.leaves.tensor import TORCH_TENSOR
from cloudckpt.leaves.value import VALUE
from cloudckpt.leaves.variable import VARIABLE

for _kind in (SHARDED, VARIABLE, NDARRAY, NUMPY_SCALAR, VALUE, TORCH_TENSOR, OPAQUE_BYTES, JAX_ARRAY):
    register(_kind)

__all__ = [
    "ArrayLeaf",
    "Builder",
    "Collected",
    "LeafEntry",
    "LeafKind",
    "LeafPlan",
    "Setter",
    "ShardedLeaf",
    "builder_for",
    "kind_of",
    "register",
    "registered",
    "unregister",
]
