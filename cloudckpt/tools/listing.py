"""``list_checkpoints``: the checkpoints in a directory, committed or not, and which is latest.

One LIST of the directory finds every index and data object; each index is then read
(in parallel) for its object sizes and user metadata, and the state file for what the
manager keeps. Names without an index are of two kinds:

- "evicted": the index is gone (the manager evicted the checkpoint), but committed
  checkpoints still name some of its data objects - an incremental save reused bytes of
  them - so those objects stay until no checkpoint names them. The row says which
  checkpoints keep them and how many of their bytes those read (the rest is stale).
- "incomplete": saves that never committed - data objects no index names - which
  ``collect_garbage`` removes once they are old enough.

Sizes are bytes stored, each object counted once, under the checkpoint name its write gave
it: a row's ``size`` is its index plus the data objects carrying its name, so the rows add
up to the directory's total. Bytes a checkpoint reads from another one's objects are in
``shared`` ("reuses 80 B of ckpt-1"), not counted again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cloudckpt.errors import CheckpointFormatError, NotFoundError
from cloudckpt.format import CheckpointIndex
from cloudckpt.format.sniff import ForeignCheckpoint
from cloudckpt.format.state_file import CheckpointState
from cloudckpt.manager.directory import latest_name, read_state_tolerant
from cloudckpt.storage import ObjectMeta, Storage
from cloudckpt.tfbundle import Bundle
from cloudckpt.tools.directory import checkpoint_number, open_directory, scan_directory, sort_names
from cloudckpt.tools.foreign import format_name, is_directory_checkpoint, object_sizes, open_checkpoint
from cloudckpt.tools.inspect import TF_FORMAT
from cloudckpt.tools.ranges import Span, merge_spans, object_spans, span_bytes
from cloudckpt.tools.verify import stored_size

log = logging.getLogger("cloudckpt.tools")

#: Row statuses, in the order a summary counts them.
STATUSES = ("committed", "evicted", "incomplete", "unreadable", "missing")


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """One checkpoint name in a directory.

    Attributes:
        status: ``committed`` | ``evicted`` | ``incomplete`` | ``unreadable`` | ``missing``.
        size: bytes stored under this name: its index and every data object its writes made.
        objects: how many objects that is.
        time: the index's (or, without one, the newest data object's) modification time.
        metadata: user metadata of a committed cloudckpt checkpoint.
        latest / preserved / managed: what the state file says of it.
        stray_objects: data objects of this name that no committed index names.
        problem: why an index is unreadable, or a state file entry is missing.
        new_bytes: incremental checkpoints: array bytes new in this one.
        shared: bytes this one reads from earlier checkpoints' objects, by checkpoint.
        format: ``cloudckpt``, ``tensorflow`` (a TensorBundle, read by ``cloudckpt.tfbundle``) or another
            registered foreign format (``torch-dcp``: a sub-directory holding torch DCP's layout).
        kept_for: other committed checkpoints that name data objects of this one (its own index aside).
        kept_bytes: how many bytes of those objects they read; ``kept_size``: the objects' whole size.
    """

    name: str
    status: str
    size: int = 0
    objects: int = 0
    time: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    latest: bool = False
    preserved: bool = False
    managed: bool = False
    stray_objects: int = 0
    problem: str | None = None
    new_bytes: int = 0
    shared: Mapping[str, int] = field(default_factory=dict)
    format: str = "cloudckpt"
    kept_for: tuple[str, ...] = ()
    kept_bytes: int = 0
    kept_size: int = 0

    @property
    def number(self) -> int | None:
        """The ``N`` of ``ckpt-N`` (``None`` for other names)."""
        return checkpoint_number(self.name)


@dataclass(frozen=True, slots=True)
class DirectoryListing:
    """What :func:`list_checkpoints` found in one directory.

    Attributes:
        directory: its URL.
        latest: the checkpoint a resume would pick (``None``: none).
        state_file: whether the state file ``checkpoint`` exists.
        checkpoints: every checkpoint name, numbered ones in numeric order.
        subdirectories: first path segments of deeper keys (other runs, for hints).
    """

    directory: str
    latest: str | None
    state_file: bool
    checkpoints: tuple[CheckpointRow, ...]
    subdirectories: tuple[str, ...]

    @property
    def stored_bytes(self) -> int:
        """Bytes stored in the directory's checkpoints: every object belongs to one row, so each counts once."""
        return sum(r.size for r in self.checkpoints)


def read_state_quietly(storage: Storage) -> CheckpointState | None:
    """The state file, or ``None`` (absent or unreadable: the listing goes by objects)."""
    found = read_state_tolerant(storage, on_garbled=lambda exc: log.warning("%s; listing without it", exc))
    return found[0] if found else None


def _load(storage: Storage, name: str) -> CheckpointIndex | Bundle | ForeignCheckpoint | Exception:
    try:
        loaded = open_checkpoint(storage, name)
        if isinstance(loaded, Bundle):
            stored_size(loaded)  # HEAD its shards now, in this pool (a missing one: unreadable)
        return loaded
    except (CheckpointFormatError, NotFoundError, ImportError) as exc:  # ImportError: a reader's framework
        return exc


def _foreign_directories(storage: Storage, subdirectories: set[str]
                         ) -> dict[str, ForeignCheckpoint | Exception]:
    """The sub-directories that are foreign checkpoints (torch DCP's layout), opened, in parallel."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        marked = dict(zip(subdirectories, pool.map(lambda n: is_directory_checkpoint(storage, n), subdirectories),
                          strict=True))
        names = [n for n, is_one in marked.items() if is_one]
        opened = dict(zip(names, pool.map(lambda n: _load(storage, n), names), strict=True))
    return {n: o for n, o in opened.items() if isinstance(o, ForeignCheckpoint | Exception)}


def _foreign_row(storage: Storage, name: str, found: ForeignCheckpoint | Exception, scan_nested: list[ObjectMeta]
                 ) -> CheckpointRow:
    """A sub-directory that is a foreign checkpoint: its files are the row's objects."""
    stamps = [m.last_modified for m in scan_nested if m.last_modified]
    row = CheckpointRow(name, "committed", size=sum(m.size for m in scan_nested), objects=len(scan_nested),
                        time=max(stamps) if stamps else None)
    if isinstance(found, Exception):
        return replace(row, status="unreadable", problem=str(found))
    missing = sorted(k for k, size in object_sizes(storage, found).items() if size is None)
    if missing:
        return replace(row, status="unreadable", format=format_name(found.format),
                       problem=f"{len(missing)} object(s) its metadata names are missing: {', '.join(missing[:3])}")
    return replace(row, format=format_name(found.format))


def _named_by(indexes: dict[str, CheckpointIndex]) -> tuple[dict[str, set[str]], dict[str, list[Span]]]:
    """Per data object: the committed checkpoints whose index names it, and the byte spans they read of it."""
    users: dict[str, set[str]] = {}
    spans: dict[str, list[Span]] = {}
    for name, index in indexes.items():
        for obj in index.objects:
            users.setdefault(obj.name, set()).add(name)
        for number, read in object_spans(index).items():
            spans.setdefault(index.objects[number].name, []).extend(read)
    return users, spans


def list_checkpoints(url: str) -> DirectoryListing:
    """Every checkpoint name in the directory ``url`` and what it holds (``cloudckpt ls``).

    An empty listing is not an error here (``cloudckpt ls`` makes it one).
    """
    storage = open_directory(url.rstrip("/") or url)
    scan = scan_directory(storage)
    state = read_state_quietly(storage) if scan.has_state else None
    listed = set(state.all_model_checkpoint_paths) if state else set()
    preserved = set(state.preserved) if state else set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = dict(zip(scan.indexes, pool.map(lambda n: _load(storage, n), scan.indexes), strict=True))
    users, spans = _named_by({n: i for n, i in loaded.items() if isinstance(i, CheckpointIndex)})
    latest = latest_name(storage) if scan.indexes else None  # foreign directories: no state file says which
    rows: dict[str, CheckpointRow] = {}
    for name in scan.names:
        data = scan.data.get(name, [])
        index_meta = scan.indexes.get(name)
        index = loaded.get(name)
        own = {o.name for o in index.objects} if isinstance(index, CheckpointIndex) else set()
        kept = [m for m in data if m.key not in own and users.get(m.key, set()) - {name}]
        strays = sum(1 for m in data if m.key not in own and not users.get(m.key))
        row = CheckpointRow(name, "incomplete", size=sum(m.size for m in data), objects=len(data),
                            kept_for=tuple(sort_names({u for m in kept for u in users[m.key]} - {name})),
                            kept_bytes=sum(span_bytes(merge_spans(spans.get(m.key, []))) for m in kept),
                            kept_size=sum(m.size for m in kept))
        if index_meta is None:
            stamps = [m.last_modified for m in data if m.last_modified]
            row = replace(row, time=max(stamps) if stamps else None, status="evicted" if kept else "incomplete",
                          stray_objects=strays if kept else 0)
        elif isinstance(index, CheckpointIndex):
            by_checkpoint = index.bytes_by_checkpoint()
            new_bytes = by_checkpoint.pop(name, 0)
            row = replace(row, status="committed", time=index_meta.last_modified, metadata=dict(index.metadata),
                          size=row.size + index_meta.size, objects=row.objects + 1, stray_objects=strays,
                          new_bytes=new_bytes, shared=dict(sorted(by_checkpoint.items())))
        elif isinstance(index, Bundle):
            row = replace(row, status="committed", time=index_meta.last_modified, format=TF_FORMAT,
                          size=row.size + stored_size(index), objects=row.objects + 1 + index.header.num_shards,
                          stray_objects=strays)
        elif isinstance(index, ForeignCheckpoint):
            row = replace(row, status="committed", time=index_meta.last_modified, format=format_name(index.format),
                          size=row.size + index_meta.size, objects=row.objects + 1, stray_objects=strays)
        else:
            row = replace(row, status="unreadable", time=index_meta.last_modified, problem=str(index),
                          size=row.size + index_meta.size, objects=row.objects + 1)
        rows[name] = row
    foreign = _foreign_directories(storage, scan.subdirectories - set(rows))
    for name, found in foreign.items():
        rows[name] = _foreign_row(storage, name, found, scan.nested.get(name, []))
    for name in listed - set(rows):
        rows[name] = CheckpointRow(name, "missing", problem="listed in the state file, but its index is gone")
    ordered = tuple(replace(rows[name], managed=name in listed, preserved=name in preserved, latest=name == latest)
                    for name in sort_names(set(rows)))
    return DirectoryListing(storage.url, latest, scan.has_state, ordered,
                            tuple(sorted(scan.subdirectories - set(foreign))))
