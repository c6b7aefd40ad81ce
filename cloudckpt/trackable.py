"""``Trackable`` (objects whose attributes are checkpoint dependencies) and ``Variable``.

Like ``tf.Module``: assigning a variable, array, container or another trackable to an
attribute makes it part of the checkpoint under that attribute's name. The restore side
lives in ``cloudckpt.restoring.assign``; this module only offers the hook it needs for deferred
restoration (a value that arrives in ``__setattr__`` after ``restore`` ran), so the
object layer does not depend on the I/O layers above it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

#: Instance attribute holding deferred restorations (never itself a dependency).
DEFERRED_ATTR = "_cloudckpt_deferred"


class DeferredRestore(Protocol):
    """A checkpoint value waiting for the attribute it belongs to (see ``cloudckpt.restoring.assign``)."""

    def restore(self, owner: Trackable, name: str, value: Any) -> None:
        """Restore the stored value into ``value``, just attached as ``owner.<name>``."""


class Trackable:
    """Base class for objects whose attributes are checkpointed, recursively.

    Public attributes are dependencies whatever they hold (an unsupported value is an
    error at save time, naming the attribute). Attributes starting with ``_`` are
    dependencies only when they hold a ``Trackable``, ``Variable`` or numpy array - so
    a class can keep helpers (loggers, callables) in private attributes.

    Deferred restoration: values the checkpoint holds for attributes that do not exist
    yet are restored the moment the attribute is assigned.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        pending: dict[str, DeferredRestore] | None = self.__dict__.get(DEFERRED_ATTR)
        if pending and name in pending:
            pending.pop(name).restore(self, name, value)

    def _checkpoint_dependencies(self) -> Iterator[tuple[str, Any]]:
        """``(name, value)`` of every attribute that is part of the checkpoint, sorted."""
        for name, value in sorted(vars(self).items()):
            if name == DEFERRED_ATTR:
                continue
            if name.startswith("_") and not isinstance(value, (Trackable, Variable, np.ndarray)):
                continue
            yield name, value

    def _attribute_owner(self, name: str) -> Trackable:
        """The object that holds dependency ``name`` (a rooted ``Checkpoint`` delegates)."""
        return self

    def _add_deferred(self, name: str, deferred: DeferredRestore) -> None:
        """Register a value to restore when ``self.<name>`` is assigned."""
        pending = self.__dict__.get(DEFERRED_ATTR)
        if pending is None:
            pending = {}
            object.__setattr__(self, DEFERRED_ATTR, pending)
        pending[name] = deferred

    def _clear_deferred(self) -> None:
        self.__dict__.pop(DEFERRED_ATTR, None)


class Variable:
    """A mutable, numpy-backed value: ``tf.Variable`` for numpy state.

    The value lives in one owned, C-contiguous array, so restore reads straight into it
    and ``save`` writes it without a copy. ``assign`` keeps the shape and dtype fixed,
    as TensorFlow does (a training step counter stays an int64 scalar).

    Args:
        initial_value: anything ``numpy.asarray`` accepts; copied.
        name: an optional name, for messages only (the checkpoint key is the attribute path).
        dtype: the dtype to convert ``initial_value`` to.
    """

    __slots__ = ("_array", "_name")

    def __init__(self, initial_value: ArrayLike, name: str | None = None, dtype: DTypeLike | None = None) -> None:
        array = np.array(initial_value, dtype=dtype, copy=True, order="C")
        if array.dtype == object:
            raise ValueError(f"Variable {name or ''} cannot hold Python objects (dtype=object)")
        self._array: NDArray[Any] = array
        self._name = name

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    @property
    def value(self) -> NDArray[Any]:
        """A read-only view of the current value (no copy); use ``numpy()`` for a copy."""
        view = self._array.view()
        view.flags.writeable = False
        return view

    def numpy(self) -> NDArray[Any]:
        """A copy of the current value (a scalar variable gives a 0-d array)."""
        return self._array.copy()

    def assign(self, value: ArrayLike) -> Variable:
        """Replace the value in place; ``ValueError`` if the shape differs, ``TypeError`` if the dtype cannot hold it
        (see ``assign_add``)."""
        new = np.asarray(value)
        if new.shape != self._array.shape:
            raise ValueError(f"cannot assign a value of shape {new.shape} to Variable "
                             f"{self._name or ''} of shape {self._array.shape}")
        with self._casting("assign", new):
            np.copyto(self._array, new, casting="same_kind")
        return self

    def assign_add(self, delta: ArrayLike) -> Variable:
        """Add ``delta`` in place; the dtype is kept, so ``TypeError`` for a delta it cannot hold
        (1.7 to an int64 variable), as ``assign`` - never a silent truncation."""
        with self._casting("assign_add", delta):
            np.add(self._array, delta, out=self._array, casting="same_kind")
        return self

    def assign_sub(self, delta: ArrayLike) -> Variable:
        """Subtract ``delta`` in place; ``TypeError`` for a delta the dtype cannot hold (see ``assign_add``)."""
        with self._casting("assign_sub", delta):
            np.subtract(self._array, delta, out=self._array, casting="same_kind")
        return self

    @contextlib.contextmanager
    def _casting(self, method: str, value: object) -> Iterator[None]:
        """One message for a value of another kind, whichever method met it.

        Why ``same_kind`` everywhere: ``tf.Variable`` refuses a float for an int variable in
        ``assign`` and ``assign_add`` alike; numpy's ``unsafe`` casting would truncate 1.7 to 1.
        """
        try:
            yield
        except TypeError as exc:  # numpy's UFuncTypeError / copyto's casting error
            kind = np.asarray(value).dtype
            name = f" {self._name!r}" if self._name else ""
            raise TypeError(f"cannot {method} a {kind} value to Variable{name} of dtype {self._array.dtype}: it "
                            f"would change its kind (truncate a float, say); convert it explicitly") from exc

    def _buffer(self) -> NDArray[Any]:
        """The live array (for the checkpoint machinery; not a public view)."""
        return self._array

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> NDArray[Any]:
        if dtype is None and not copy:
            return self.value
        return np.array(self._array, dtype=dtype, copy=True)

    def __int__(self) -> int:
        return int(self._array)

    def __float__(self) -> float:
        return float(self._array)

    def __index__(self) -> int:
        return self._array.__index__()

    def __repr__(self) -> str:
        name = f" {self._name!r}" if self._name else ""
        return f"<cloudckpt.Variable{name} shape={self.shape} dtype={self.dtype} value={self._array!r}>"
