"""The registry of leaf kinds: ordered, first match wins.

The order is the classification order: a sharded array before the plain array types, a
``Variable`` before a numpy array, a numpy scalar before the Python values, and every leaf
kind before the containers and adapters the graph walk tries after them. A kind
registered later is tried after the built-in ones (``cloudckpt.leaves`` registers those
on import), so it can claim only values no earlier kind claims.
"""

from __future__ import annotations

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.leaves.base import LeafEntry, LeafKind, display_path

_kinds: list[LeafKind] = []


def register(kind: LeafKind) -> None:
    """Add ``kind`` after the kinds registered so far (registering the same object again does nothing).

    Raises:
        TypeError: ``kind`` is not a ``LeafKind`` instance.
    """
    if not isinstance(kind, LeafKind):
        raise TypeError(f"register() takes a LeafKind instance, got {kind!r}")
    if kind not in _kinds:
        _kinds.append(kind)


def unregister(kind: LeafKind) -> None:
    """Remove ``kind`` (a kind that was never registered is ignored)."""
    if kind in _kinds:
        _kinds.remove(kind)


def registered() -> tuple[LeafKind, ...]:
    """The kinds, in the order they are tried."""
    return tuple(_kinds)


def kind_of(value: object) -> LeafKind | None:
    """The first kind that claims ``value``, or ``None`` (then it is no leaf)."""
    for kind in _kinds:
        if kind.matches(value):
            return kind
    return None


def builder_for(path: str, entry: LeafEntry) -> LeafKind:
    """The first kind that builds ``entry`` fresh.

    Raises:
        CheckpointFormatError: no kind builds it (a pytype the format knows but no
            registered kind writes; the index reader refuses pytypes it does not know).
    """
    for kind in _kinds:
        if kind.builds(entry):
            return kind
    raise CheckpointFormatError(f"no leaf kind builds {display_path(path)} (stored as {entry!r})")
