"""Sharded arrays: this process's shards of a global array, written and restored by box.

The sharded types themselves (``cloudckpt.distributed``'s ``ShardedArray``, torch's
``DTensor``) live in a layer above this one: it registers a *view* function with
``register_sharded`` that shows one of its values as a ``ShardedValue``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from cloudckpt.format import ArrayPyType, dtype_name, parse_dtype, storage_dtype
from cloudckpt.leaves.base import (
    Builder,
    LeafKind,
    LeafPlan,
    Setter,
    ShardedLeaf,
    array_entry,
    check_array,
    display_path,
)
from cloudckpt.leaves.copier import DeviceArray

#: One local shard to restore: ``(start, shape, dest or None, assign)`` (see ``ShardedValue``).
RestoreTarget = tuple[tuple[int, ...], tuple[int, ...], "NDArray[Any] | DeviceArray | None",
                      Callable[[NDArray[Any]], None]]


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

    def save_shards(self) -> Sequence[tuple[tuple[int, ...], NDArray[Any] | DeviceArray]]:
        """``(start, data)`` of every local shard; ``data`` C-contiguous, little-endian, or a
        ``DeviceArray`` (a shard in device memory, copied by its copier)."""
        ...

    def restore_targets(self) -> Sequence[RestoreTarget]:
        """``(start, shape, dest, assign)`` per local shard: restore reads straight into
        ``dest`` when it is not ``None`` (then ``assign`` is not called; a ``DeviceArray`` is
        filled through bounce buffers), else into a fresh buffer of ``shape`` that ``assign``
        then copies in."""
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


def sharded_leaf(value: object, path: str) -> ShardedLeaf:
    """The ``ShardedLeaf`` of a sharded array: its local shards, checked against the global shape."""
    view = sharded_view(value)
    assert view is not None
    shape = tuple(view.global_shape)
    try:
        dtype_name(view.dtype)
    except ValueError as exc:
        raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None
    shards: dict[tuple[int, ...], NDArray[Any] | DeviceArray] = {}
    for start, data in view.save_shards():
        box = tuple(start)
        if len(box) != len(shape) or data.ndim != len(shape) or any(
                s < 0 or s + n > dim for s, n, dim in zip(box, data.shape, shape, strict=True)):
            raise ValueError(f"cannot checkpoint {display_path(path)}: a shard at {box} of shape {data.shape} "
                             f"lies outside the global shape {shape}")
        if not isinstance(data, DeviceArray):  # a device shard's copier writes C order, stored dtype
            wanted = storage_dtype(data.dtype)
            if wanted != data.dtype:
                data = data.astype(wanted)
            if not data.flags.c_contiguous:
                data = np.ascontiguousarray(data)
        if box in shards and shards[box].shape != data.shape:
            raise ValueError(f"cannot checkpoint {display_path(path)}: two local shards at {box} differ in shape")
        shards.setdefault(box, data)
    return ShardedLeaf(shape, storage_dtype(view.dtype), view.pytype, tuple(shards.items()))


class ShardedKind(LeafKind):
    """A value some registered view shows as a ``ShardedValue``; tried before every other kind.

    Builds no entries of its own: its entries carry the pytype of what it shards (an
    ``ndarray`` or a ``tensor``), and a fresh build gives that.
    """

    name = "sharded"

    def matches(self, value: object) -> bool:
        return bool(_sharded_views) and sharded_view(value) is not None

    def collect(self, value: Any, path: str) -> ShardedLeaf:
        return sharded_leaf(value, path)

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        _into_shards(plan, live)

    def build_into(self, plan: LeafPlan, template: Any) -> Builder | None:
        _into_shards(plan, template)
        return lambda: template


def _into_shards(plan: LeafPlan, live: Any) -> None:
    """Read each local shard's box (only its bytes), whatever layout the checkpoint has.

    Local shards with the same box (replicas on several local devices) are read once
    and copied, so a host fetches each byte it needs once.
    """
    entry = array_entry(plan, live)
    view = sharded_view(live)
    assert view is not None
    check_array(plan, entry, tuple(view.global_shape), view.dtype)
    dtype = parse_dtype(entry.dtype)
    first_of: dict[tuple[int, ...], NDArray[Any]] = {}
    for start, shape, dest, assign in view.restore_targets():
        start = tuple(start)
        if isinstance(dest, DeviceArray):  # a device shard: through bounce buffers, no host copy of the shard
            plan.read_to_device(dest, start=start)
            continue
        if start in first_of:
            plan.then(_assigner(dest, assign, first_of[start]))
            continue
        if dest is not None and dest.flags.c_contiguous and dest.dtype == dtype:
            plan.read_into(dest, start=start)
            first_of[start] = dest
        else:
            buffer = plan.read_new(tuple(shape), start=start)
            plan.then(_assigner(dest, assign, buffer))
            first_of[start] = buffer


def _assigner(dest: NDArray[Any] | DeviceArray | None, assign: Callable[[NDArray[Any]], None],
              source: NDArray[Any]) -> Callable[[], None]:
    """Copy ``source`` into a shard after the reads: into ``dest`` if it is an array, else via ``assign``."""
    def apply() -> None:
        if isinstance(dest, np.ndarray):
            np.copyto(dest, source)
        else:
            assign(source)
    return apply


SHARDED = ShardedKind()
