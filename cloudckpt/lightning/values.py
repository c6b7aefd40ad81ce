"""A Lightning checkpoint dict as a tree cloudckpt stores, and back: the types JSON lacks, tagged.

Lightning's checkpoint dict is mostly what cloudckpt saves anyway (tensors, nested dicts,
lists, tuples, JSON scalars, ``bytes``). A few containers are not: sets (callback state),
Lightning's ``AttributeDict`` and ``argparse.Namespace`` (hyperparameters). They are
stored as the plain container they resemble (a set as a list, the others as a dict), and
the key path of each is recorded with its tag in the index's metadata
(``{"lightning": {"version": 1, "types": {path: tag}}}``), so no new value encoding - and
no format change - is needed. Anything else the collector cannot store is refused by it,
with the key path and the type (never pickled).

Both walks are iterative (a tree from an index is untrusted input; its depth is bounded
only by the key-path length), and the load-side walk descends only into the prefixes of
tagged paths, so a state dict of thousands of tensors is not walked at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import encode_segment, join_path

#: Metadata key of the tags, and the version of this convention.
METADATA_KEY = "lightning"
TAGS_VERSION = 1
SET, FROZENSET, ATTRIBUTE_DICT, NAMESPACE = "set", "frozenset", "attribute_dict", "namespace"
TAGS = frozenset({SET, FROZENSET, ATTRIBUTE_DICT, NAMESPACE})


def _attribute_dict() -> type[dict[str, Any]]:
    """Lightning's ``AttributeDict`` (imported only when a checkpoint holds one)."""
    from lightning.fabric.utilities.data import AttributeDict

    return AttributeDict


def _tag_of(value: object) -> str | None:
    if isinstance(value, frozenset):
        return FROZENSET
    if isinstance(value, set):
        return SET
    if isinstance(value, argparse.Namespace):
        return NAMESPACE
    if isinstance(value, dict) and type(value).__name__ == "AttributeDict" and type(value).__module__.startswith(
            "lightning"):
        return ATTRIBUTE_DICT
    return None


def _set_items(value: set[Any] | frozenset[Any]) -> list[Any]:
    """A set's items in an order that does not depend on hashing (so equal sets save equal)."""
    return sorted(value, key=lambda item: (type(item).__name__, repr(item)))


def _children(value: object) -> list[tuple[Any, Any]] | None:
    """``(key, child)`` of a container the walk descends into, or ``None`` for a leaf."""
    if isinstance(value, (set, frozenset)):
        return list(enumerate(_set_items(value)))
    if isinstance(value, argparse.Namespace):
        return list(vars(value).items())
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return None


class _Assemble:
    """A container to build once its children are on the value stack."""

    __slots__ = ("keys", "path", "value")

    def __init__(self, value: object, path: str, keys: list[Any]) -> None:
        self.value, self.path, self.keys = value, path, keys


def _rebuild(root: Any, make: Callable[[Any, str, list[Any], list[Any]], Any],
             descend: Callable[[str], bool]) -> Any:
    """Post-order copy of ``root``'s containers: ``make(original, path, keys, new children)``
    builds each one (``descend(path)`` false: the value is kept as it is)."""
    values: list[Any] = []
    active: set[int] = set()
    work: list[tuple[Any, str] | _Assemble] = [(root, "")]
    while work:
        item = work.pop()
        if isinstance(item, _Assemble):
            active.discard(id(item.value))
            cut = len(values) - len(item.keys)
            children = values[cut:]
            del values[cut:]
            values.append(make(item.value, item.path, item.keys, children))
            continue
        value, path = item
        pairs = _children(value) if descend(path) else None
        if pairs is None:
            values.append(value)
            continue
        if id(value) in active:
            raise ValueError(f"cannot checkpoint {path!r}: it refers back to one of its own containers (a cycle)")
        active.add(id(value))
        work.append(_Assemble(value, path, [k for k, _ in pairs]))
        for key, child in reversed(pairs):
            segment = str(key) if isinstance(value, (list, tuple, set, frozenset)) else encode_segment(key)
            work.append((child, join_path(path, segment)))
    assert len(values) == 1
    return values[0]


def to_storable(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``checkpoint`` with its sets, ``AttributeDict`` s and ``Namespace`` s made plain, and the
    tags (key path relative to the dict -> tag) that turn them back.

    Only containers are copied (tensors are shared). A key that cannot be a path segment
    or a value the collector cannot store is refused later by ``cloudckpt``'s collector,
    with its key path.
    """
    tags: dict[str, str] = {}

    def make(original: Any, path: str, keys: list[Any], children: list[Any]) -> Any:
        tag = _tag_of(original)
        if tag is not None:
            tags[path] = tag
        if isinstance(original, (set, frozenset, list)):
            return children
        if isinstance(original, tuple):
            return tuple(children)
        return dict(zip(keys, children, strict=True))

    tree = _rebuild(dict(checkpoint), make, lambda path: True)
    return tree, tags


def parse_tags(metadata: Mapping[str, Any], where: str) -> dict[str, str]:
    """The tags an index's metadata records (none: a checkpoint with nothing to turn back).

    Raises:
        CheckpointFormatError: malformed tags, or a tag this version does not know; names ``where``.
    """
    doc = metadata.get(METADATA_KEY)
    if doc is None:
        return {}
    if not isinstance(doc, dict) or doc.get("version") != TAGS_VERSION or not isinstance(doc.get("types"), dict):
        raise CheckpointFormatError(f"{where}: metadata {METADATA_KEY!r} is not version {TAGS_VERSION} of "
                                    f"cloudckpt.lightning's type tags: {doc!r:.200}")
    tags: dict[str, str] = doc["types"]
    for path, tag in tags.items():
        if tag not in TAGS:
            raise CheckpointFormatError(f"{where}: {path!r} is tagged {tag!r}, not one of {sorted(TAGS)}")
    return tags


def from_storable(tree: Any, tags: Mapping[str, str], where: str) -> Any:
    """The Lightning checkpoint dict of a stored ``tree``: tagged containers turned back.

    Raises:
        CheckpointFormatError: a tag names a path that is not in the tree, or a container
            of the wrong kind for its tag; the message names ``where`` and the path.
    """
    prefixes = {""}
    for path in tags:
        parts = path.split("/")
        prefixes.update("/".join(parts[:i]) for i in range(1, len(parts)))
    seen: set[str] = set()

    def make(original: Any, path: str, keys: list[Any], children: list[Any]) -> Any:
        tag = tags.get(path)
        if isinstance(original, dict):
            rebuilt: Any = dict(zip(keys, children, strict=True))
        else:
            rebuilt = tuple(children) if isinstance(original, tuple) else children
        if tag is None:
            return rebuilt
        seen.add(path)
        if tag in (SET, FROZENSET) and isinstance(original, list):
            try:
                return set(rebuilt) if tag == SET else frozenset(rebuilt)
            except TypeError:
                raise CheckpointFormatError(f"{where}: {path!r} is tagged {tag} but holds unhashable items") from None
        if tag == NAMESPACE and isinstance(original, dict) and all(isinstance(k, str) for k in keys):
            return argparse.Namespace(**rebuilt)
        if tag == ATTRIBUTE_DICT and isinstance(original, dict):
            return _attribute_dict()(rebuilt)
        raise CheckpointFormatError(f"{where}: {path!r} is tagged {tag} but holds a {type(original).__name__}")

    tree = _rebuild(tree, make, lambda path: path in prefixes or path in tags)
    missing = sorted(set(tags) - seen)
    if missing:
        raise CheckpointFormatError(f"{where}: tagged paths that hold no list or dict in the checkpoint: {missing[:5]}")
    return tree
