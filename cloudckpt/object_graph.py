"""The object graph: what a value is to a checkpoint, and the walk that flattens it.

``classify`` decides, once for save and restore alike, whether a value is a leaf (the
first registered ``cloudckpt.leaves`` kind that claims it: arrays, ``Variable``, numpy
scalars, Python values, torch tensors, sharded arrays), a container (dict, list,
tuple), a ``Trackable`` or an object with an adapter (``state_dict`` objects, random
generators). ``collect`` walks a root into a flat, ordered mapping of key paths
(``model/layers/0/kernel``) to entries, asking each leaf's kind for its entry. Nothing
is ever pickled: anything else is refused with a ``ValueError`` naming its path and type.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cloudckpt import adapters
from cloudckpt.adapters import StateAdapter
from cloudckpt.format import MAX_KEY_PATH, NodeEntry, NodeType, encode_segment, join_path
from cloudckpt.leaves import ArrayLeaf, Collected, LeafKind, ShardedLeaf, kind_of
from cloudckpt.leaves.base import describe_type, display_path
from cloudckpt.leaves.sharded import RestoreTarget, ShardedValue, register_sharded, sharded_view
from cloudckpt.trackable import Trackable

__all__ = [
    "ArrayLeaf",
    "Classified",
    "Collected",
    "Kind",
    "RestoreTarget",
    "ShardedLeaf",
    "ShardedValue",
    "children",
    "classify",
    "collect",
    "describe_type",
    "display_path",
    "live_value_paths",
    "register_sharded",
    "sharded_view",
    "unsupported",
]


class Kind(enum.Enum):
    """What a live value is to the checkpoint: a leaf (its ``LeafKind`` says the rest) or a structure."""

    LEAF = "leaf"
    TRACKABLE = "object"
    DICT = "dict"
    LIST = "list"
    TUPLE = "tuple"
    ADAPTED = "adapted"

    @property
    def is_container(self) -> bool:
        return self in (Kind.TRACKABLE, Kind.DICT, Kind.LIST, Kind.TUPLE)


@dataclass(frozen=True, slots=True)
class Classified:
    """A value's kind, with its leaf kind (``Kind.LEAF``) or adapter (``Kind.ADAPTED``)."""

    kind: Kind
    adapter: StateAdapter | None = None
    leaf: LeafKind | None = None

    @property
    def stateful(self) -> bool:
        """May be a ``Checkpoint`` dependency (a bare Python or numpy scalar may not)."""
        return self.leaf.stateful if self.leaf is not None else True

    @property
    def plain(self) -> bool:
        """Plain data (nobody holds a reference into it): may be replaced whole."""
        return self.leaf.plain if self.leaf is not None else self.kind in (Kind.DICT, Kind.LIST, Kind.TUPLE)

    @property
    def in_state(self) -> bool:
        """May appear inside an adapter's state (an object or a ``Variable`` may not)."""
        return self.leaf.in_state if self.leaf is not None else self.kind not in (Kind.TRACKABLE, Kind.ADAPTED)


def classify(value: object) -> Classified | None:
    """The kind of ``value``, or ``None`` if it cannot be checkpointed.

    Leaf kinds are tried first, in registry order, then the containers, then adapters.
    """
    leaf = kind_of(value)
    if leaf is not None:
        return Classified(Kind.LEAF, leaf=leaf)
    if isinstance(value, Trackable):
        return Classified(Kind.TRACKABLE)
    if isinstance(value, dict):
        return Classified(Kind.DICT)
    if isinstance(value, list):
        return Classified(Kind.LIST)
    if isinstance(value, tuple):
        return Classified(Kind.TUPLE)
    adapter = adapters.adapter_for(value)
    if adapter is not None:
        return Classified(Kind.ADAPTED, adapter)
    return None


def unsupported(path: str, value: object) -> ValueError:
    return ValueError(
        f"cannot checkpoint {display_path(path)}: a {describe_type(value)} is not checkpointable. "
        f"Supported: numpy arrays, cloudckpt.Variable, Trackable objects, dicts/lists/tuples, "
        f"None/bool/int/float/str, torch tensors, objects with state_dict()/load_state_dict(), "
        f"and numpy/random/torch random generators.")


def children(value: Any, kind: Kind) -> list[tuple[str, Any]]:
    """``(segment, child)`` pairs of a container, in a stable order."""
    if kind is Kind.TRACKABLE:
        return [(encode_segment(name), child) for name, child in value._checkpoint_dependencies()]
    if kind is Kind.DICT:
        return [(encode_segment(key), child) for key, child in value.items()]
    if kind in (Kind.LIST, Kind.TUPLE):
        return [(str(i), child) for i, child in enumerate(value)]
    raise TypeError(kind)


_NODE_TYPE: dict[Kind, NodeType] = {Kind.TRACKABLE: "object", Kind.DICT: "dict", Kind.LIST: "list",
                                    Kind.TUPLE: "tuple"}


class _Leave:
    """A marker on the walk's stack: the container ``value`` is done (it holds ``value`` alive,
    so its ``id`` cannot be reused by another object while it is on the cycle-check path)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


def collect(root: Trackable) -> dict[str, Collected]:
    """Flatten ``root`` (and everything it depends on) into ``{key path: entry}``.

    Walks with an explicit stack, not recursion, so a structure nested thousands of levels
    deep is saved (and read back: restore walks the same way) instead of raising
    ``RecursionError``. Entries come out in pre-order, children in their order; a leaf's
    entry is what its kind's ``collect`` gives.

    Raises:
        ValueError: an unsupported value, an object array, a cyclic reference, a dict key
            that cannot round-trip, or a key path longer than a reader accepts
            (``MAX_KEY_PATH``: so no index is written that cannot be read back); the
            message names the key path.
    """
    out: dict[str, Collected] = {}
    active: set[int] = set()
    stack: list[tuple[Any, str, bool] | _Leave] = [(root, "", False)]
    while stack:
        item = stack.pop()
        if isinstance(item, _Leave):
            active.discard(id(item.value))
            continue
        value, path, inside_adapter = item
        if len(path) > MAX_KEY_PATH:
            raise ValueError(f"cannot checkpoint {path[:200]!r}...: its key path is {len(path)} characters long, "
                             f"over the {MAX_KEY_PATH} an index may hold (nested too deeply, or a very long key)")
        found = classify(value)
        if found is None or (inside_adapter and not found.in_state):
            raise unsupported(path, value)
        if found.leaf is not None:
            out[path] = found.leaf.collect(value, path)
            continue
        kind = found.kind
        if id(value) in active:
            raise ValueError(f"cannot checkpoint {display_path(path)}: it refers back to one of its own "
                             f"containers (a cycle)")
        active.add(id(value))
        stack.append(_Leave(value))
        if kind is Kind.ADAPTED:
            assert found.adapter is not None
            state = found.adapter.get_state(value)
            state_kind = classify(state)
            if state_kind is None or state_kind.kind not in (Kind.DICT, Kind.LIST, Kind.TUPLE):
                raise ValueError(f"cannot checkpoint {display_path(path)}: its state is a "
                                 f"{describe_type(state)}, not a dict, list or tuple")
            items = _safe_children(state, state_kind.kind, path)
            out[path] = NodeEntry(_NODE_TYPE[state_kind.kind], tuple(s for s, _ in items), found.adapter.name)
            inside = True
        else:
            items = _safe_children(value, kind, path)
            out[path] = NodeEntry(_NODE_TYPE[kind], tuple(s for s, _ in items))
            inside = inside_adapter
        stack.extend((child, join_path(path, segment), inside) for segment, child in reversed(items))
    return out


def _safe_children(value: Any, kind: Kind, path: str) -> list[tuple[str, Any]]:
    try:
        return children(value, kind)
    except ValueError as exc:
        raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None


def live_value_paths(root: Trackable) -> Iterator[str]:
    """Paths of the values a restore should fill: leaves, and adapted objects as wholes.

    Walks without touching array data (the load-status assertions call it), with an
    explicit stack like ``collect``.
    """
    active: set[int] = set()
    stack: list[tuple[Any, str] | _Leave] = [(root, "")]
    while stack:
        item = stack.pop()
        if isinstance(item, _Leave):
            active.discard(id(item.value))
            continue
        value, path = item
        found = classify(value)
        if found is None:
            raise unsupported(path, value)
        if not found.kind.is_container:
            yield path
            continue
        if id(value) in active:
            continue
        active.add(id(value))
        stack.append(_Leave(value))
        items = _safe_children(value, found.kind, path)
        stack.extend((child, join_path(path, segment)) for segment, child in reversed(items))
