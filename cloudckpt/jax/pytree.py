"""A JAX pytree as the object graph sees it: nested dicts keyed by its key paths, and back.

Why convert instead of teaching the graph every pytree node type: ``jax.tree_util``
already knows them all - dicts, lists, tuples, ``NamedTuple``s (optax states),
``flax.struct.dataclass``es, Flax NNX ``State``, anything registered - and names every
leaf by a key path. Each key becomes one segment (a dict key as itself, a sequence index,
an attribute name, a flattened index as its number), so a leaf is stored under a readable
path such as ``params/dense/kernel`` or ``opt_state/0/mu/dense/kernel``, and
``load_variable``, ``ls``, ``inspect`` and ``export`` read JAX checkpoints unchanged. The
structure itself comes back from the caller's ``like`` tree (its treedef), never from the
checkpoint: nothing stored can make a restore build an object of some type.

``None`` leaves are kept (as JSON nulls), Python scalars and numpy arrays are leaves of
their own kinds, and a typed PRNG key is stored as ``{"key_data": <uint32 array>,
"impl": "<impl name>"}`` and rebuilt with ``jax.random.wrap_key_data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from cloudckpt.errors import CheckpointMismatchError
from cloudckpt.leaves.jax_array import is_prng_key

#: The segments a typed PRNG key is stored as.
KEY_DATA, KEY_IMPL = "key_data", "impl"
#: The segment of a tree that is one bare leaf (it has no key path of its own).
BARE_LEAF = "value"
#: jax's constructors, typed loosely (jax leaves them unannotated).
_PartitionSpec: Any = jax.sharding.PartitionSpec
_ShapeDtypeStruct: Any = jax.ShapeDtypeStruct


def _is_leaf(value: object) -> bool:
    return value is None


def segment(key: Any) -> Any:
    """The graph segment of one ``jax.tree_util`` key (a dict key stays what it is)."""
    tree_util = jax.tree_util
    if isinstance(key, tree_util.DictKey):
        return key.key
    if isinstance(key, tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, tree_util.GetAttrKey):
        return key.name
    if isinstance(key, tree_util.FlattenedIndexKey):
        return str(key.key)
    raise ValueError(f"a pytree key of unknown kind {key!r}")


def shown(segments: Sequence[Any]) -> str:
    """How messages name a leaf: its key path."""
    return "/".join(str(s) for s in segments) or "the tree"


@dataclass(frozen=True, slots=True)
class Flat:
    """A pytree taken apart: its treedef, each leaf's segments, and its leaves."""

    treedef: Any
    paths: tuple[tuple[Any, ...], ...]
    leaves: tuple[Any, ...]


def flatten(tree: Any) -> Flat:
    """The leaves of ``tree`` with their segments (``None`` kept as a leaf)."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    paths = tuple(tuple(segment(k) for k in path) or (BARE_LEAF,) for path, _ in pairs)
    return Flat(treedef, paths, tuple(leaf for _, leaf in pairs))


def to_graph(flat: Flat, *, for_restore: bool) -> dict[Any, Any]:
    """Nested dicts holding the leaves at their segments.

    ``for_restore``: the leaves are restore targets - numpy arrays are replaced by fresh
    ones of the same shape and dtype (a restore returns new values and leaves ``like``
    as it was), PRNG keys by targets for their key data.

    Raises:
        ValueError: two leaves map to one path, or one leaf's path is another's prefix
            (naming the path).
    """
    root: dict[Any, Any] = {}
    leaf_paths = set(flat.paths)
    for segments, leaf in zip(flat.paths, flat.leaves, strict=True):
        node = root
        for depth, seg in enumerate(segments[:-1]):
            child = node.setdefault(seg, {})
            if not isinstance(child, dict) or segments[:depth + 1] in leaf_paths:
                raise ValueError(f"cannot checkpoint {shown(segments)}: {shown(segments[:depth + 1])} is also a leaf")
            node = child
        if segments[-1] in node:
            raise ValueError(f"cannot checkpoint {shown(segments)}: two leaves of the tree have this key path")
        node[segments[-1]] = _graph_leaf(leaf, for_restore)
    return root


def _graph_leaf(leaf: Any, for_restore: bool) -> Any:
    if for_restore and isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and is_prng_key(leaf):
        return {KEY_DATA: _key_data_target(leaf), KEY_IMPL: ""}
    if isinstance(leaf, jax.Array) and is_prng_key(leaf):
        return {KEY_DATA: jax.random.key_data(leaf), KEY_IMPL: str(jax.random.key_impl(leaf))}
    if for_restore and isinstance(leaf, np.ndarray):
        return np.empty_like(leaf, order="C")
    return leaf


def _key_data_target(like: Any) -> Any:
    """What a typed key's key data restores into: the key data of ``like``, or its shape and sharding."""
    if isinstance(like, jax.Array):
        return jax.random.key_data(like)
    data = jax.eval_shape(jax.random.key_data, like)
    sharding = like.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(data.shape) - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(sharding.mesh, _PartitionSpec(*spec))
    elif sharding is not None and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        raise ValueError(f"cannot restore a PRNG key with sharding {sharding!r}: pass a jax.Array or a "
                         f"ShapeDtypeStruct with a NamedSharding as its like")
    return _ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def from_graph(graph: dict[Any, Any], flat: Flat) -> Any:
    """The tree of ``flat``'s structure with the values ``graph`` now holds at its leaves' paths."""
    leaves = []
    for segments, like in zip(flat.paths, flat.leaves, strict=True):
        value: Any = graph
        for seg in segments:
            value = value[seg]
        if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)) and is_prng_key(like):
            value = _wrap_key(value, segments)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(flat.treedef, leaves)


def _wrap_key(stored: dict[Any, Any], segments: Sequence[Any]) -> Any:
    """A typed PRNG key from its stored key data and impl name (both untrusted: refused by name, not run)."""
    impl = stored[KEY_IMPL]
    if not isinstance(impl, str) or not impl:
        raise CheckpointMismatchError(f"cannot restore the PRNG key {shown(segments)!r}: the checkpoint names no key "
                                      f"impl (found {impl!r}); the tree was not replaced")
    try:
        return jax.random.wrap_key_data(stored[KEY_DATA], impl=impl)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointMismatchError(f"cannot restore the PRNG key {shown(segments)!r} with impl {impl!r}: {exc}; "
                                      f"the tree was not replaced") from None
