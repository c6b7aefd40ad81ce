"""A checkpoint directory as the tools see it: one LIST grouped by checkpoint, and what a URL names.

``ls``, ``verify``, ``copy`` and ``gc`` all start here: a URL is a committed checkpoint
(its index exists) or a directory, and a directory is listed once and sorted into
checkpoints, crashed saves' data, sub-directories and the state file.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from cloudckpt.errors import CheckpointNotFoundError, InvalidURLError
from cloudckpt.format import INDEX_SUFFIX, index_key, object_checkpoint
from cloudckpt.format.sniff import find_directory_layout
from cloudckpt.storage import ObjectMeta, Storage, resolve, split_url, storage_for_directory
from cloudckpt.storage.base import TEMP_PREFIX

_NUMBERED_RE = re.compile(r".*-(\d+)")


def open_directory(url: str) -> Storage:
    """The storage of a checkpoint directory (the library's cached one, as restores use)."""
    return storage_for_directory(url)


def checkpoint_at(url: str) -> tuple[Storage, str] | None:
    """``(storage, name)`` if ``url`` names a committed checkpoint, else ``None``.

    Why "committed": a checkpoint exists iff its index does. A path that only has data
    objects is a crashed save, and a path that names a directory has no index either -
    unless the directory is a foreign checkpoint of a registered directory layout (torch
    DCP's ``<name>/.metadata``; one HEAD per registered layout), which is one checkpoint.
    """
    try:
        split_url(url)
    except InvalidURLError:
        return None  # a bucket root: a directory, never a checkpoint
    location = resolve(url)
    if location.storage.exists(index_key(location.name)):
        return location.storage, location.name
    if find_directory_layout(location.storage, location.name) is not None:
        return location.storage, location.name
    return None


def checkpoint_number(name: str) -> int | None:
    match = _NUMBERED_RE.fullmatch(name)
    return int(match[1]) if match else None


def sort_names(names: Sequence[str] | set[str]) -> list[str]:
    """Numbered checkpoints in numeric order (``ckpt-10`` after ``ckpt-9``), others by name."""
    return sorted(names, key=lambda n: (checkpoint_number(n) is None, checkpoint_number(n) or 0, n))


@dataclass(slots=True)
class DirectoryScan:
    """One LIST of a checkpoint directory, grouped by checkpoint name.

    Attributes:
        indexes: committed checkpoints: name -> the index object's metadata.
        data: name -> its data objects (of any write: committed or crashed).
        subdirectories: first path segments of deeper keys (other runs, for hints).
        has_state: whether the state file ``checkpoint`` exists.
        nested: the objects under each sub-directory (a foreign directory checkpoint's files).
    """

    indexes: dict[str, ObjectMeta] = field(default_factory=dict)
    data: dict[str, list[ObjectMeta]] = field(default_factory=dict)
    subdirectories: set[str] = field(default_factory=set)
    has_state: bool = False
    nested: dict[str, list[ObjectMeta]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sort_names(set(self.indexes) | set(self.data))


def scan_directory(storage: Storage) -> DirectoryScan:
    """List the directory once and sort its objects into checkpoints."""
    scan = DirectoryScan()
    for meta in storage.list():
        key = meta.key
        owner = object_checkpoint(key)  # spread data objects sit in <name>.d/<hh>/: ours, not a sub-directory
        if owner is not None:
            scan.data.setdefault(owner, []).append(meta)
        elif "/" in key:
            if not key.startswith(TEMP_PREFIX):
                scan.subdirectories.add(key.split("/", 1)[0])
                scan.nested.setdefault(key.split("/", 1)[0], []).append(meta)
        elif key == "checkpoint":
            scan.has_state = True
        elif key.endswith(INDEX_SUFFIX):
            scan.indexes[key[:-len(INDEX_SUFFIX)]] = meta
    return scan


def no_checkpoints_message(url: str, subdirectories: Collection[str]) -> str:
    """"Nothing here", with a hint when the checkpoints are one level down (in ``subdirectories``)."""
    message = f"no checkpoints under {url}"
    if subdirectories:
        shown = sorted(subdirectories)[:5]
        more = f" (and {len(subdirectories) - 5} more)" if len(subdirectories) > 5 else ""
        message += f"; sub-directories: {', '.join(s + '/' for s in shown)}{more}"
    return message


def no_checkpoints(url: str, scan: DirectoryScan) -> CheckpointNotFoundError:
    """The error of a directory that holds no committed checkpoint (its message: :func:`no_checkpoints_message`)."""
    return CheckpointNotFoundError(no_checkpoints_message(url, scan.subdirectories), url)
