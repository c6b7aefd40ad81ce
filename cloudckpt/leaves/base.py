"""The leaf-kind protocol: what one kind of leaf value is to a checkpoint, save and restore alike.

A leaf kind (numpy array, ``Variable``, numpy scalar, Python value, torch tensor, sharded
array, opaque bytes) is one ``LeafKind`` object. It answers four questions, and the graph
walk (``cloudckpt.object_graph.collect``) and the restore plan (``cloudckpt.restoring.assign``) only ever
ask the kind, never switch on it:

- **metadata and host view** (``collect``): the dtype, shape and pytype the index records,
  and the bytes to write (an ``ArrayLeaf``/``ShardedLeaf``) - or the JSON value itself
  (a ``ValueEntry``);
- **restore in place** (``restore``): check a live value against the stored entry and
  plan reads straight into its memory, or reads into a buffer and an assignment after;
- **build into a template** (``build_into``): the same for a value an adapter's state
  already holds (a module's parameter), or ``None`` to build fresh;
- **build fresh** (``build``): a new value from the stored bytes, when there is no live
  value to restore into (``cloudckpt.load``, an adapter's state, a replaced list); the
  kind that builds is the one whose ``builds`` claims the entry (by its pytype).

Restoring is planned before anything is touched: a kind only *plans* through a
``LeafPlan`` (reads and after-read steps) and raises ``CheckpointMismatchError`` (through
``mismatch``/``refuse``) while planning; nothing it plans runs until every value checked.

The device seam (GUIDE section 12, "device copies are a copier"): every kind here hands
``collect`` a *host* view - memory the CPU can read, shared with the live value where it
can be (zero copy) - and ``ArrayLeaf.array`` carries it. A device kind (a CUDA tensor, a
``jax.Array`` on an accelerator) has no such view without a copy: its ``collect`` hands a
``DeviceArray`` (``cloudckpt.leaves.copier``: metadata, and the ``Copier`` that moves its
bytes) instead, and the steps that need bytes ask that copier - the async snapshot in
batches into the reused staging area, a sync upload through a bounded ring of host buffers,
a restore (``LeafPlan.read_to_device``) through bounce buffers. Nothing else below
``collect`` needs to know which kind a leaf came from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Union

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import CheckpointMismatchError
from cloudckpt.format import (
    ArrayEntry,
    ArrayPyType,
    NodeEntry,
    ValueEntry,
    dtype_name,
    parse_dtype,
    storage_dtype,
)
from cloudckpt.leaves.copier import DeviceArray

Setter = Callable[[Any], None]
Builder = Callable[[], Any]


@dataclass(frozen=True, slots=True)
class ArrayLeaf:
    """An array to write: its bytes (C-contiguous, little-endian) and the Python type to rebuild.

    ``array`` is the host view a kind's ``collect`` handed over, or a ``DeviceArray`` whose
    copier moves its bytes when a step needs them (see the module docstring).

    ``frozen``: the host view's bytes can never change while it is referenced (a CPU
    ``jax.Array``'s view of its immutable buffer, which the view keeps alive), so an async
    save uploads from it after the caller resumes instead of copying it into staging first.
    A kind sets it only when nothing - not the caller, not the framework - can write there.
    """

    array: NDArray[Any] | DeviceArray
    pytype: ArrayPyType
    frozen: bool = False


@dataclass(frozen=True, slots=True)
class ShardedLeaf:
    """This process's shards of a global array: ``(start, data)`` boxes, data C-contiguous.

    Shards with the same start (replicas on several local devices) appear once. A shard on
    a device is a ``DeviceArray`` (a DTensor's CUDA local shard).
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    pytype: ArrayPyType
    shards: tuple[tuple[tuple[int, ...], NDArray[Any] | DeviceArray], ...]
    frozen: bool = False  # every shard's bytes can never change: as ``ArrayLeaf.frozen``


#: What the graph walk yields per key path: inner nodes, JSON values and arrays to write.
Collected = Union[NodeEntry, ValueEntry, ArrayLeaf, ShardedLeaf]  # noqa: UP007 - runtime alias on 3.10
#: A stored leaf entry: the entries a leaf kind restores and builds.
LeafEntry = Union[ArrayEntry, ValueEntry]  # noqa: UP007 - runtime alias on 3.10


class LeafPlan(Protocol):
    """What a kind may ask of the restore while it plans one stored leaf (``cloudckpt.restoring.assign``).

    Reads fill their buffers only when the whole restore executes, after every value was
    checked; ``then`` steps run after all reads, in the order they were planned.
    """

    @property
    def path(self) -> str:
        """The key path of the stored entry."""
        ...

    @property
    def entry(self) -> LeafEntry:
        """The stored entry (an array entry for every kind but the Python-value kind)."""
        ...

    def read_into(self, dest: NDArray[Any], start: tuple[int, ...] | None = None) -> None:
        """Read the stored bytes straight into live memory ``dest`` (C-contiguous, the stored
        dtype); ``start``: where ``dest`` sits in the global array (a shard's box)."""
        ...

    def read_new(self, shape: tuple[int, ...] | None = None,
                 start: tuple[int, ...] | None = None) -> NDArray[Any]:
        """A fresh buffer the stored bytes (or the box at ``start``) will be read into.

        Only for sizes a live value vouches for (it was checked against the entry)."""
        ...

    def read_built(self) -> NDArray[Any]:
        """A fresh buffer of the entry's whole shape, for a value built from the checkpoint
        alone: its size is checked against the real objects before it is allocated."""
        ...

    def read_to_device(self, dest: DeviceArray, start: tuple[int, ...] | None = None) -> None:
        """Read the stored bytes (or the box at ``start``) into device memory ``dest``: ranged reads
        into bounded host bounce buffers, CRC32C-verified there, copied by ``dest.copier`` while
        the next reads run - no host or device buffer of the whole array."""
        ...

    def then(self, step: Callable[[], None]) -> None:
        """Run ``step`` after every read of the restore (assignments, copies)."""
        ...


class LeafKind(ABC):
    """One kind of leaf value. Subclass, then ``cloudckpt.leaves.register`` an instance.

    Attributes:
        name: how messages and ``repr`` name the kind.
        pytype: what array entries this kind writes say they were; an entry with this
            pytype is built by the first registered kind that writes it (``builds``).
            ``None``: the kind builds no array entries of its own. A new pytype is a new
            on-store format (``cloudckpt.format.ARRAY_PYTYPES``).
        stateful: may be a ``Checkpoint`` dependency (holds state restorable in place; a
            bare Python scalar is not, as in TensorFlow).
        plain: plain data that nobody holds a reference into, so a list of it may be
            replaced whole when its stored length differs.
        in_state: may appear inside an adapter's state (a ``state_dict``); a ``Variable``
            may not (it would not be restored into).
    """

    name: ClassVar[str] = ""
    pytype: ClassVar[ArrayPyType | None] = None
    stateful: ClassVar[bool] = True
    plain: ClassVar[bool] = False
    in_state: ClassVar[bool] = True

    @abstractmethod
    def matches(self, value: object) -> bool:
        """Whether ``value`` is of this kind (cheap: called for every value of every walk;
        must not import a framework for values that are not its own)."""

    @abstractmethod
    def collect(self, value: Any, path: str) -> Collected:
        """The entry to write for ``value``: metadata and host view (see the module docstring).

        Raises:
            ValueError: ``value`` cannot be checkpointed; the message names ``path``.
        """

    @abstractmethod
    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        """Plan restoring ``plan.entry`` into ``live`` (``setter`` replaces it, where it can be).

        Raises:
            CheckpointMismatchError: the entry does not fit ``live`` (``mismatch``).
        """

    def build_into(self, plan: LeafPlan, template: Any) -> Builder | None:
        """A builder that restores ``plan.entry`` into ``template`` (an array entry), or ``None``
        to build a fresh value instead. Default: always fresh."""
        return None

    def builds(self, entry: LeafEntry) -> bool:
        """Whether this kind builds ``entry`` fresh (default: array entries of its pytype)."""
        return isinstance(entry, ArrayEntry) and self.pytype is not None and entry.pytype == self.pytype

    def build(self, plan: LeafPlan) -> Builder:
        """A builder of a fresh value from ``plan.entry`` (default: the stored numpy array)."""
        dest = plan.read_built()
        return lambda: dest

    def __repr__(self) -> str:
        return f"<leaf kind {self.name or type(self).__qualname__}>"


def describe_type(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def display_path(path: str) -> str:
    """How messages name a key path (the root is the checkpoint itself)."""
    return repr(path) if path else "the checkpoint root"


def describe_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> str:
    return f"an array of shape {shape} and dtype {dtype}"


def describe_entry(entry: LeafEntry) -> str:
    """How a mismatch names what the checkpoint holds."""
    if isinstance(entry, ValueEntry):
        return f"the value {entry.value!r}"
    return describe_array(entry.shape, parse_dtype(entry.dtype))


def mismatch_error(path: str, stored: str, live: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"cannot restore {display_path(path)}: the checkpoint holds {stored}, the object is {live}; "
        f"nothing was restored")


def mismatch(plan: LeafPlan, live: object) -> CheckpointMismatchError:
    """The entry does not fit ``live`` (a value, or a description of it such as 'a read-only ...')."""
    found = live if isinstance(live, str) else f"a {describe_type(live)}"
    return mismatch_error(plan.path, describe_entry(plan.entry), found)


def refuse(plan: LeafPlan, reason: str) -> CheckpointMismatchError:
    """The live value cannot take any stored bytes (``reason`` says why)."""
    return CheckpointMismatchError(f"cannot restore {display_path(plan.path)}: {reason}; nothing was restored")


def array_entry(plan: LeafPlan, live: object) -> ArrayEntry:
    """``plan.entry`` if it is an array entry; a mismatch with ``live`` otherwise."""
    if not isinstance(plan.entry, ArrayEntry):
        raise mismatch(plan, live)
    return plan.entry


def check_array(plan: LeafPlan, entry: ArrayEntry, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """A mismatch unless a live array of ``shape`` and ``dtype`` can take ``entry``."""
    if tuple(shape) != entry.shape or storage_dtype(np.dtype(dtype)) != parse_dtype(entry.dtype):
        raise mismatch(plan, describe_array(tuple(shape), np.dtype(dtype)))


def read_or_copy(plan: LeafPlan, live: NDArray[Any], copy: Callable[[NDArray[Any]], Any]) -> None:
    """Read straight into ``live`` if its layout allows, else into a buffer ``copy`` takes after."""
    entry = plan.entry
    assert isinstance(entry, ArrayEntry)
    if live.flags.c_contiguous and live.dtype == parse_dtype(entry.dtype):
        plan.read_into(live)
    else:
        dest = plan.read_new()
        plan.then(lambda: copy(dest))


def host_array(array: NDArray[Any], path: str) -> NDArray[Any]:
    """``array`` as the bytes to write: a stored dtype, C-contiguous, little-endian (a view if it is)."""
    try:
        dtype_name(array.dtype)
    except ValueError as exc:
        raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None
    wanted = storage_dtype(array.dtype)
    if wanted != array.dtype:
        array = array.astype(wanted)
    return array if array.flags.c_contiguous else np.array(array, order="C", copy=True)
