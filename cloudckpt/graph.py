"""The object graph: what a value is to a checkpoint, and the walk that flattens it.

``classify`` decides, once for save and restore alike, whether a value is an array leaf
(numpy array, ``Variable``, numpy scalar, torch tensor), a JSON leaf (``None``, bool,
int, float, str), a container (dict, list, tuple), a ``Trackable`` or an object with an
adapter (``state_dict`` objects, random generators). ``collect`` walks a root into a
flat, ordered mapping of key paths (``model/layers/0/kernel``) to entries. Nothing is
ever pickled: anything else is refused with a ``ValueError`` naming its path and type.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Union

import numpy as np
from numpy.typing import NDArray

from cloudckpt import adapters
from cloudckpt.adapters import StateAdapter
from cloudckpt.format import (
    MAX_KEY_PATH,
    ArrayPyType,
    NodeEntry,
    NodeType,
    ValueEntry,
    dtype_name,
    encode_segment,
    encode_value,
    join_path,
    storage_dtype,
)
from cloudckpt.trackable import Trackable, Variable


class Kind(enum.Enum):
    """What a live value is to the checkpoint."""

    VARIABLE = "variable"
    NDARRAY = "ndarray"
    NUMPY_SCALAR = "numpy_scalar"
    TENSOR = "tensor"
    SHARDED = "sharded"
    VALUE = "value"
    TRACKABLE = "object"
    DICT = "dict"
    LIST = "list"
    TUPLE = "tuple"
    ADAPTED = "adapted"

    @property
    def is_array(self) -> bool:
        return self in (Kind.VARIABLE, Kind.NDARRAY, Kind.NUMPY_SCALAR, Kind.TENSOR, Kind.SHARDED)

    @property
    def is_container(self) -> bool:
        return self in (Kind.TRACKABLE, Kind.DICT, Kind.LIST, Kind.TUPLE)


@dataclass(frozen=True, slots=True)
class Classified:
    kind: Kind
    adapter: StateAdapter | None = None


#: One local shard to restore: ``(start, shape, dest or None, assign)`` (see ``ShardedValue``).
RestoreTarget = tuple[tuple[int, ...], tuple[int, ...], "NDArray[Any] | None", Callable[[NDArray[Any]], None]]


class ShardedValue(Protocol):
    """What a sharded array (this process's shards of a global array) shows the checkpoint.

    Implemented by ``cloudckpt.distributed`` for its ``ShardedArray`` and for torch
    ``DTensor``; defined here so the graph walker and restore need not import it (the
    distributed layer sits above this one and registers itself with ``register_sharded``).
    """

    @property
    def global_shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    @property
    def pytype(self) -> ArrayPyType: ...

    def save_shards(self) -> Sequence[tuple[tuple[int, ...], NDArray[Any]]]:
        """``(start, data)`` of every local shard; ``data`` C-contiguous, little-endian."""
        ...

    def restore_targets(self) -> Sequence[RestoreTarget]:
        """``(start, shape, dest, assign)`` per local shard: restore reads straight into
        ``dest`` when it is not ``None`` (then ``assign`` is not called), else into a fresh
        buffer of ``shape`` that ``assign`` then copies in."""
        ...


#: Functions that return a ``ShardedValue`` view of an object, or ``None`` if it is not theirs.
_sharded_views: list[Callable[[object], ShardedValue | None]] = []


def register_sharded(view: Callable[[object], ShardedValue | None]) -> None:
    """Teach the graph a sharded array type (called by ``cloudckpt.distributed`` on import)."""
    if view not in _sharded_views:
        _sharded_views.append(view)


def sharded_view(value: object) -> ShardedValue | None:
    """The sharded-array view of ``value``, or ``None`` if it is not a sharded array."""
    for view in _sharded_views:
        found = view(value)
        if found is not None:
            return found
    return None


def classify(value: object) -> Classified | None:
    """The kind of ``value``, or ``None`` if it cannot be checkpointed."""
    if _sharded_views and sharded_view(value) is not None:
        return Classified(Kind.SHARDED)
    if isinstance(value, Variable):
        return Classified(Kind.VARIABLE)
    if isinstance(value, np.ndarray):
        return Classified(Kind.NDARRAY)
    if isinstance(value, np.generic):
        return Classified(Kind.NUMPY_SCALAR)
    if value is None or isinstance(value, (bool, int, float, str)):
        return Classified(Kind.VALUE)
    if adapters.is_tensor(value):
        return Classified(Kind.TENSOR)
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


def describe_type(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def display_path(path: str) -> str:
    """How messages name a key path (the root is the checkpoint itself)."""
    return repr(path) if path else "the checkpoint root"


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


def array_of(value: Any, kind: Kind, path: str) -> NDArray[Any]:
    """The bytes of an array leaf as a C-contiguous little-endian array (a view if possible)."""
    if kind is Kind.VARIABLE:
        array = value._buffer()
    elif kind is Kind.TENSOR:
        from cloudckpt.adapters import torch as torch_adapter
        try:
            array = torch_adapter.tensor_to_numpy(value)
        except ValueError as exc:
            raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None
    else:
        array = np.asarray(value)
    try:
        dtype_name(array.dtype)
    except ValueError as exc:
        raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None
    wanted = storage_dtype(array.dtype)
    if wanted != array.dtype:
        array = array.astype(wanted)
    return array if array.flags.c_contiguous else np.array(array, order="C", copy=True)


@dataclass(frozen=True, slots=True)
class ArrayLeaf:
    """An array to write: its bytes (C-contiguous) and the Python type to rebuild."""

    array: NDArray[Any]
    pytype: ArrayPyType


@dataclass(frozen=True, slots=True)
class ShardedLeaf:
    """This process's shards of a global array: ``(start, data)`` boxes, data C-contiguous.

    Shards with the same start (replicas on several local devices) appear once.
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    pytype: ArrayPyType
    shards: tuple[tuple[tuple[int, ...], NDArray[Any]], ...]


Collected = Union[NodeEntry, ValueEntry, ArrayLeaf, ShardedLeaf]  # noqa: UP007 - runtime alias on 3.10

_PYTYPE: dict[Kind, ArrayPyType] = {Kind.VARIABLE: "variable", Kind.NDARRAY: "ndarray",
                                    Kind.NUMPY_SCALAR: "numpy_scalar", Kind.TENSOR: "tensor"}
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
    ``RecursionError``. Entries come out in pre-order, children in their order.

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
        if found is None or (inside_adapter and found.kind in (Kind.TRACKABLE, Kind.ADAPTED, Kind.VARIABLE)):
            raise unsupported(path, value)
        kind = found.kind
        if kind is Kind.SHARDED:
            out[path] = sharded_leaf(value, path)
            continue
        if kind.is_array:
            if isinstance(value, np.ndarray) and value.dtype == object:
                raise ValueError(f"cannot checkpoint {display_path(path)}: object arrays are refused "
                                 f"(they hold Python objects, which would need pickling)")
            out[path] = ArrayLeaf(array_of(value, kind, path), _PYTYPE[kind])
            continue
        if kind is Kind.VALUE:
            out[path] = encode_value(value)
            continue
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


def sharded_leaf(value: object, path: str) -> ShardedLeaf:
    """The ``ShardedLeaf`` of a sharded array: its local shards, checked against the global shape."""
    view = sharded_view(value)
    assert view is not None
    shape = tuple(view.global_shape)
    try:
        dtype_name(view.dtype)
    except ValueError as exc:
        raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None
    shards: dict[tuple[int, ...], NDArray[Any]] = {}
    for start, data in view.save_shards():
        box = tuple(start)
        if len(box) != len(shape) or data.ndim != len(shape) or any(
                s < 0 or s + n > dim for s, n, dim in zip(box, data.shape, shape, strict=True)):
            raise ValueError(f"cannot checkpoint {display_path(path)}: a shard at {box} of shape {data.shape} "
                             f"lies outside the global shape {shape}")
        wanted = storage_dtype(data.dtype)
        if wanted != data.dtype:
            data = data.astype(wanted)
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        if box in shards and shards[box].shape != data.shape:
            raise ValueError(f"cannot checkpoint {display_path(path)}: two local shards at {box} differ in shape")
        shards.setdefault(box, data)
    return ShardedLeaf(shape, storage_dtype(view.dtype), view.pytype, tuple(shards.items()))


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
