"""Restore: match a checkpoint's entries to live objects, validate everything, then assign.

The order is what keeps a failed restore harmless::

    match     -> walk index and live graph together; every array target is checked
                 (shape, dtype, writability, adapter keys) and nothing is touched yet
    read      -> ranged reads straight into the targets' own buffers, CRC32C verified
    apply     -> replacements of immutable values (scalars, tuples), adapters'
                 ``load_state_dict``/``set_state``, in post-order (children first)
    defer     -> values for attributes that do not exist yet wait on their Trackable
                 and are restored when the attribute is assigned

A shape or dtype mismatch is raised in ``match`` and leaves every object untouched; a
checksum or I/O failure during ``read`` may leave live targets partly written (the error
says so).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

from numpy.typing import NDArray

from cloudckpt.errors import CheckpointMismatchError
from cloudckpt.format import ArrayEntry, CheckpointIndex, Entry, NodeEntry, ValueEntry, decode_segment, join_path
from cloudckpt.leaves import Builder, LeafEntry, Setter, builder_for
from cloudckpt.leaves.base import mismatch, mismatch_error
from cloudckpt.leaves.copier import DeviceArray
from cloudckpt.object_graph import Classified, Kind, children, classify, describe_type, display_path, unsupported
from cloudckpt.restoring.array_reads import RangeReader, read_arrays
from cloudckpt.restoring.buffers import ObjectSizes, ReadTarget, backed_buffer, new_buffer
from cloudckpt.restoring.device_reads import DeviceTarget, read_to_device, staged_reads
from cloudckpt.storage import Storage
from cloudckpt.trackable import Trackable


def value_paths(index: CheckpointIndex) -> list[str]:
    """Paths that carry values: leaves, and adapted objects as wholes."""
    out: list[str] = []
    stack = [""]
    while stack:
        path = stack.pop()
        entry = index.entries[path]
        if isinstance(entry, NodeEntry) and entry.adapter is None:
            stack.extend(join_path(path, seg) for seg in reversed(entry.children))
        else:
            out.append(path)
    return out


class RestoreSession:
    """One ``restore``/``read``: the index, where its bytes are, and what was consumed.

    Deferred restorations keep the session alive, so values can still be fetched when
    their objects are created later (as TensorFlow does).
    """

    def __init__(self, storage: Storage, index: CheckpointIndex, ranges: RangeReader | None = None) -> None:
        self.storage = storage
        self.index = index
        #: How the restore's reads are made when not directly (the io host's relay); only the
        #: first, collective restore uses it - deferred restorations read for themselves.
        self.ranges = ranges
        self.url = storage.url_for(index.name)
        self.expected = value_paths(index)
        #: Real object sizes, checked before an index-sized allocation (not through a relay:
        #: then this host may not touch storage at all).
        self.sizes = ObjectSizes(storage) if ranges is None else None
        self._consumed: set[str] = set()
        self._lock = threading.Lock()

    @property
    def consumed(self) -> set[str]:
        with self._lock:
            return set(self._consumed)

    def unused(self) -> list[str]:
        """Checkpoint values no object has taken (yet)."""
        consumed = self.consumed
        return [p for p in self.expected if p not in consumed]

    def restore(self, path: str, live: Any, setter: Setter | None) -> None:
        """Restore the entry at ``path`` into ``live`` (validate all, read, then apply)."""
        plan = _Plan(self)
        plan.match(path, live, setter)
        plan.execute()

    def materialize(self, path: str) -> Any:
        """The stored value at ``path`` as fresh Python/numpy objects (nothing restored)."""
        plan = _Plan(self)
        build = plan.materialize(path, None)
        plan.execute()
        return build()

    def mark_consumed(self, paths: set[str]) -> None:
        with self._lock:
            self._consumed |= paths


class _Deferred:
    """A checkpoint value waiting on ``owner.<name>`` (see ``Trackable.__setattr__``)."""

    def __init__(self, session: RestoreSession, path: str) -> None:
        self.session = session
        self.path = path

    def restore(self, owner: Trackable, name: str, value: Any) -> None:
        def setter(new: Any) -> None:
            object.__setattr__(owner, name, new)
        self.session.restore(self.path, value, setter)


class _LeafPlan:
    """The ``LeafPlan`` a leaf kind plans one stored leaf through: its reads and steps join the plan's."""

    __slots__ = ("_plan", "entry", "path")

    def __init__(self, plan: _Plan, path: str, entry: LeafEntry) -> None:
        self._plan = plan
        self.path = path
        self.entry = entry

    def _array(self) -> ArrayEntry:
        assert isinstance(self.entry, ArrayEntry), "a Python value has no bytes to read"
        return self.entry

    def read_into(self, dest: NDArray[Any], start: tuple[int, ...] | None = None) -> None:
        self._plan.reads.append(ReadTarget(self.path, self._array(), dest, live=True, start=start))

    def read_new(self, shape: tuple[int, ...] | None = None,
                 start: tuple[int, ...] | None = None) -> NDArray[Any]:
        dest = new_buffer(self._array(), shape)
        self._plan.reads.append(ReadTarget(self.path, self._array(), dest, live=False, start=start))
        return dest

    def read_built(self) -> NDArray[Any]:
        session = self._plan.session
        dest = backed_buffer(session.index, self.path, self._array(), session.sizes)
        self._plan.reads.append(ReadTarget(self.path, self._array(), dest, live=False))
        return dest

    def read_to_device(self, dest: DeviceArray, start: tuple[int, ...] | None = None) -> None:
        self._plan.device_reads.append(DeviceTarget(self.path, self._array(), dest, start))

    def then(self, step: Callable[[], None]) -> None:
        self._plan.ops.append(step)


class _Plan:
    """What one restore will read and do, built entirely before anything is touched."""

    def __init__(self, session: RestoreSession) -> None:
        self.session = session
        self.entries = session.index.entries
        self.reads: list[ReadTarget] = []
        self.device_reads: list[DeviceTarget] = []
        self.ops: list[Callable[[], None]] = []
        self.deferred: list[tuple[Trackable, str, str]] = []
        self.consumed: set[str] = set()

    def execute(self) -> None:
        reads, device, copy_in = self.reads, self.device_reads, None
        if device and self.session.ranges is not None:  # a relay reads once, collectively: no rounds
            staged, copy_in = staged_reads(device)
            reads, device = [*reads, *staged], []
        read_arrays(self.session.storage, self.session.index, reads, self.session.ranges)
        if copy_in is not None:
            copy_in()
        if device:
            read_to_device(self.session.storage, self.session.index, device)
        for op in self.ops:
            op()
        for owner, name, path in self.deferred:
            owner._add_deferred(name, _Deferred(self.session, path))
        self.session.mark_consumed(self.consumed)

    # ------------------------------------------------------------------ matching
    def match(self, path: str, live: Any, setter: Setter | None) -> None:
        """Plan the restore of ``path`` into ``live``: depth first, with an explicit stack.

        Why a stack and not recursion: an index may nest thousands of levels deep (honestly
        or not), and a ``RecursionError`` mid-plan would be an untyped failure. Items are
        visited in the order recursion would visit them, and a container's ``after`` step
        (rebuilding a tuple) runs once all its children have been planned.
        """
        stack: list[tuple[str, Any, Setter | None] | Callable[[], None]] = [(path, live, setter)]
        while stack:
            item = stack.pop()
            if callable(item):
                item()
                continue
            path, live, setter = item
            entry = self.entries[path]
            found = classify(live)
            if found is None:
                raise unsupported(path, live)
            if isinstance(entry, (ArrayEntry, ValueEntry)):
                self._match_leaf(path, entry, live, found, setter)
            elif entry.adapter is not None:
                self._match_adapted(path, entry, live, found.kind, found.adapter)
            else:
                after, items = self._match_container(path, entry, live, found.kind, setter)
                if after is not None:
                    stack.append(after)
                stack.extend(reversed(items))

    def _match_leaf(self, path: str, entry: LeafEntry, live: Any, found: Classified, setter: Setter | None) -> None:
        """A stored leaf: the live value's kind plans the restore (nothing else can take a leaf)."""
        leaf = _LeafPlan(self, path, entry)
        if found.leaf is None:
            raise mismatch(leaf, live)
        found.leaf.restore(leaf, live, setter)
        self.consumed.add(path)

    def _match_adapted(self, path: str, entry: NodeEntry, live: Any, kind: Kind, adapter: Any) -> None:
        assert entry.adapter is not None
        if kind is not Kind.ADAPTED or adapter.name != entry.adapter:
            raise mismatch_error(path, f"the state of a {entry.adapter} object", f"a {describe_type(live)}")
        keys = {decode_segment(s) if entry.type == "dict" else int(s) for s in entry.children}
        try:
            adapter.check(live, keys, path)
        except ValueError as exc:
            raise CheckpointMismatchError(f"cannot restore {display_path(path)}: {exc}; nothing was restored") from None
        build = self.materialize(path, adapter.get_state(live))

        def apply() -> None:
            try:
                adapter.set_state(live, build())
            except (ValueError, TypeError, KeyError, RuntimeError) as exc:
                raise CheckpointMismatchError(
                    f"cannot restore {display_path(path)}: the {describe_type(live)} rejected the stored "
                    f"state ({exc}); objects restored before it keep their new values") from exc
        self.ops.append(apply)

    def _match_container(self, path: str, entry: NodeEntry, live: Any, kind: Kind, setter: Setter | None,
                         ) -> tuple[Callable[[], None] | None, list[tuple[str, Any, Setter | None]]]:
        """The children to match next, and what to plan after them (a tuple's rebuild)."""
        if kind.value != entry.type:
            raise mismatch_error(path, f"a {entry.type}", f"a {describe_type(live)}")
        if kind in (Kind.LIST, Kind.TUPLE) and len(live) != len(entry.children):
            self._replace_sequence(path, entry, live, kind, setter)
            return None, []
        present = dict(children(live, kind))
        tuple_items: list[Any] | None = list(live) if kind is Kind.TUPLE else None
        items: list[tuple[str, Any, Setter | None]] = []
        for seg in entry.children:
            child_path = join_path(path, seg)
            key = decode_segment(seg) if kind in (Kind.TRACKABLE, Kind.DICT) else int(seg)
            if seg in present:
                items.append((child_path, present[seg], self._child_setter(live, kind, key, tuple_items)))
            elif kind is Kind.TRACKABLE and isinstance(key, str):
                self.deferred.append((live._attribute_owner(key), key, child_path))
        if tuple_items is None or setter is None:
            return None, items
        original = live
        rebuilt = tuple_items

        def rebuild() -> None:
            if any(a is not b for a, b in zip(rebuilt, original, strict=True)):
                make = getattr(type(original), "_make", None)
                setter(make(rebuilt) if make is not None else tuple(rebuilt))
        return functools.partial(self.ops.append, rebuild), items

    def _replace_sequence(self, path: str, entry: NodeEntry, live: Any, kind: Kind, setter: Setter | None) -> None:
        """A list or tuple whose length differs from the stored one: the stored value replaces it whole.

        Item by item would leave a mix (the stored items that fit, then the live ones past
        them). Only plain data can be replaced (Python values, numpy scalars and containers
        of them: nothing anyone else holds a reference into); a sequence holding arrays,
        variables, tensors or objects must match in length, or nothing is restored. A list
        keeps its identity (its contents are replaced in place); a tuple is rebuilt.
        """
        stored = f"a {entry.type} of {_items(len(entry.children))}"
        found = f"a {describe_type(live)} of {_items(len(live))}"
        if kind is Kind.TUPLE and (setter is None or hasattr(type(live), "_fields")):
            raise CheckpointMismatchError(
                f"cannot restore {display_path(path)}: the checkpoint holds {stored}, the object is {found} "
                f"(a {'named tuple has a fixed length' if setter is not None else 'tuple cannot change in place'}); "
                f"nothing was restored")
        blocker = _not_plain(self.entries, path) or _live_not_plain(live, path)
        if blocker is not None:
            raise CheckpointMismatchError(
                f"cannot restore {display_path(path)}: the checkpoint holds {stored}, the object is {found}, "
                f"and {blocker}, so its length must match; nothing was restored")
        build = self.materialize(path, None)
        if kind is Kind.LIST:
            target = live
            self.ops.append(lambda: target.__setitem__(slice(None), build()))
        else:
            assert setter is not None
            self.ops.append(lambda: setter(build()))

    @staticmethod
    def _child_setter(live: Any, kind: Kind, key: Any, tuple_items: list[Any] | None) -> Setter:
        if kind is Kind.TRACKABLE:
            owner = live._attribute_owner(key)
            return lambda value: object.__setattr__(owner, key, value)
        if tuple_items is not None:
            return lambda value: tuple_items.__setitem__(key, value)
        return lambda value: live.__setitem__(key, value)

    # ------------------------------------------------------------------ materializing
    def materialize(self, path: str, template: Any) -> Builder:
        """A builder of the stored value at ``path``; reads into ``template``'s arrays where they fit.

        Planned with an explicit stack (pre-order, as recursion would), and the builder
        assembles containers bottom-up from a flat list - no recursion at either step,
        however deep the stored structure is.
        """
        leaves: dict[str, Builder] = {}
        nodes: list[tuple[str, str, list[tuple[Any, str]]]] = []
        stack: list[tuple[str, Any]] = [(path, template)]
        while stack:
            node_path, node_template = stack.pop()
            entry = self.entries[node_path]
            if isinstance(entry, (ArrayEntry, ValueEntry)):
                leaves[node_path] = self._build_leaf(node_path, entry, node_template)
                continue
            if entry.adapter is not None:
                self.consumed.add(node_path)
            kids = [(int(seg) if entry.type in ("list", "tuple") else decode_segment(seg), join_path(node_path, seg))
                    for seg in entry.children]
            nodes.append((node_path, entry.type, kids))
            stack.extend((child, _lookup(node_template, key)) for key, child in reversed(kids))

        def build() -> Any:
            values = {p: leaf() for p, leaf in leaves.items()}
            for node_path, node_type, kids in reversed(nodes):  # children before their parents
                if node_type in ("dict", "object"):
                    values[node_path] = {key: values.pop(child) for key, child in kids}
                elif node_type == "list":
                    values[node_path] = [values.pop(child) for _, child in kids]
                else:
                    values[node_path] = tuple(values.pop(child) for _, child in kids)
            return values[path]
        return build

    def _build_leaf(self, path: str, entry: LeafEntry, template: Any) -> Builder:
        """Read into the template's own value when its kind can take it (a module's parameters),
        else build fresh (the kind that wrote the entry's pytype builds it).

        A template array of another shape or dtype is a mismatch: the object's
        ``load_state_dict`` would fail after other objects had been restored.
        """
        self.consumed.add(path)
        leaf = _LeafPlan(self, path, entry)
        found = classify(template) if template is not None and isinstance(entry, ArrayEntry) else None
        if found is not None and found.leaf is not None:
            built = found.leaf.build_into(leaf, template)
            if built is not None:
                return built
        return builder_for(path, entry).build(leaf)


def _items(n: int) -> str:
    return f"{n} item{'' if n == 1 else 's'}"


def _not_plain(entries: Mapping[str, Entry], path: str) -> str | None:
    """Why the stored subtree at ``path`` is not plain data (``None`` if it is)."""
    stack = [path]
    while stack:
        node_path = stack.pop()
        entry = entries[node_path]
        if isinstance(entry, ArrayEntry) and not builder_for(node_path, entry).plain:
            return f"the checkpoint's {display_path(node_path)} is an array"
        if isinstance(entry, NodeEntry):
            if entry.adapter is not None or entry.type == "object":
                return f"the checkpoint's {display_path(node_path)} is an object"
            stack.extend(join_path(node_path, seg) for seg in entry.children)
    return None


def _live_not_plain(live: Any, path: str) -> str | None:
    """Why the live value at ``path`` is not plain data (``None`` if it is); cycles are walked once."""
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(live, path)]
    while stack:
        value, value_path = stack.pop()
        found = classify(value)
        if found is None or not found.plain:
            return f"the object's {display_path(value_path)} is a {describe_type(value)}"
        if found.kind.is_container and id(value) not in seen:
            seen.add(id(value))
            try:
                items = children(value, found.kind)
            except ValueError as exc:  # a key that cannot be checkpointed
                return f"the object's {display_path(value_path)} cannot be checkpointed ({exc})"
            stack.extend((child, join_path(value_path, seg)) for seg, child in items)
    return None


def _lookup(template: Any, key: Any) -> Any:
    """The template's child at ``key``, or ``None`` (then a fresh buffer is used)."""
    try:
        if isinstance(template, dict):
            return template.get(key)
        if isinstance(template, (list, tuple)) and isinstance(key, int) and key < len(template):
            return template[key]
    except TypeError:
        return None
    return None

