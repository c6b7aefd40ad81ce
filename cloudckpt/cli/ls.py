"""``cloudckpt ls URL``: the checkpoints in a directory, committed or not, and which is latest.

One LIST of the directory finds every index and data object; each index is then read
(in parallel) for its object sizes and user metadata, and the state file for what the
manager keeps. Names without an index are of two kinds:

- "evicted": the index is gone (the manager evicted the checkpoint), but committed
  checkpoints still name some of its data objects - an incremental save reused bytes of
  them - so those objects stay until no checkpoint names them. The row says which
  checkpoints keep them and how many of their bytes those read (the rest is stale).
- "incomplete": saves that never committed - data objects no index names - which
  ``cloudckpt gc`` removes once they are old enough.

Sizes are bytes stored, each object counted once, under the checkpoint name its write gave
it: a row's STORED is its index plus the data objects carrying its name, so the rows add
up to the directory's total. Bytes a checkpoint reads from another one's objects are shown
beside it ("reuses 80 B of ckpt-1"), not counted again.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cloudckpt.cli.common import (
    DirectoryScan,
    checkpoint_number,
    human_size,
    human_time,
    iso_time,
    no_checkpoints_error,
    open_directory,
    print_json,
    print_table,
    scan_directory,
    sort_names,
)
from cloudckpt.cli.ranges import Span, merge_spans, object_spans, span_bytes
from cloudckpt.cli.tf import FORMAT, stored_size
from cloudckpt.errors import CheckpointFormatError, NotFoundError
from cloudckpt.format import CheckpointIndex
from cloudckpt.manager.directory import latest_name, read_state_tolerant
from cloudckpt.state_file import CheckpointState
from cloudckpt.storage import Storage
from cloudckpt.tfbundle import Bundle, load_any_index

log = logging.getLogger("cloudckpt.cli")


@dataclass(slots=True)
class Row:
    """One checkpoint name as ``ls`` reports it."""

    name: str
    status: str  # committed | evicted | incomplete | unreadable | missing
    #: Bytes stored under this name: its index and every data object its writes made.
    size: int = 0
    objects: int = 0
    time: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    latest: bool = False
    preserved: bool = False
    managed: bool = False
    stray_objects: int = 0
    problem: str | None = None
    #: Incremental checkpoints: array bytes new in this one, and bytes reused per earlier checkpoint.
    new_bytes: int = 0
    shared: dict[str, int] = field(default_factory=dict)
    format: str = "cloudckpt"  # or "tensorflow": a TensorBundle, read by cloudckpt.tfbundle
    #: Other committed checkpoints that name data objects of this one (its own index aside), and
    #: how many bytes of those objects they read; ``kept_size``: the objects' whole size.
    kept_for: list[str] = field(default_factory=list)
    kept_bytes: int = 0
    kept_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "number": checkpoint_number(self.name), "status": self.status,
                "size": self.size, "objects": self.objects, "time": iso_time(self.time),
                "metadata": self.metadata, "latest": self.latest, "preserved": self.preserved,
                "managed": self.managed, "stray_objects": self.stray_objects, "problem": self.problem,
                "new_bytes": self.new_bytes, "shared_bytes": self.shared, "format": self.format,
                "kept_for": self.kept_for, "kept_bytes": self.kept_bytes}


def read_state_quietly(storage: Storage) -> CheckpointState | None:
    """The state file, or ``None`` (absent or unreadable: ``ls`` still lists by objects)."""
    found = read_state_tolerant(storage, on_garbled=lambda exc: log.warning("%s; listing without it", exc))
    return found[0] if found else None


def _load(storage: Storage, name: str) -> CheckpointIndex | Bundle | Exception:
    try:
        loaded = load_any_index(storage, name)
        if isinstance(loaded, Bundle):
            stored_size(loaded)  # HEAD its shards now, in this pool (a missing one: unreadable)
        return loaded
    except (CheckpointFormatError, NotFoundError) as exc:
        return exc


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


def collect_rows(storage: Storage, scan: DirectoryScan) -> tuple[list[Row], str | None]:
    """Every checkpoint name in the directory as a row, and the latest one's name."""
    state = read_state_quietly(storage) if scan.has_state else None
    listed = set(state.all_model_checkpoint_paths) if state else set()
    preserved = set(state.preserved) if state else set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = dict(zip(scan.indexes, pool.map(lambda n: _load(storage, n), scan.indexes), strict=True))
    users, spans = _named_by({n: i for n, i in loaded.items() if isinstance(i, CheckpointIndex)})
    rows: dict[str, Row] = {}
    for name in scan.names:
        data = scan.data.get(name, [])
        index_meta = scan.indexes.get(name)
        index = loaded.get(name)
        own = {o.name for o in index.objects} if isinstance(index, CheckpointIndex) else set()
        kept = [m for m in data if m.key not in own and users.get(m.key, set()) - {name}]
        strays = sum(1 for m in data if m.key not in own and not users.get(m.key))
        row = Row(name, "incomplete", size=sum(m.size for m in data), objects=len(data),
                  kept_for=sort_names({u for m in kept for u in users[m.key]} - {name}),
                  kept_bytes=sum(span_bytes(merge_spans(spans.get(m.key, []))) for m in kept),
                  kept_size=sum(m.size for m in kept))
        if index_meta is None:
            stamps = [m.last_modified for m in data if m.last_modified]
            row.time = max(stamps) if stamps else None
            row.status = "evicted" if kept else "incomplete"
            row.stray_objects = strays if kept else 0
        elif isinstance(index, CheckpointIndex):
            by_checkpoint = index.bytes_by_checkpoint()
            row.status, row.time, row.metadata = "committed", index_meta.last_modified, dict(index.metadata)
            row.size, row.objects = row.size + index_meta.size, row.objects + 1
            row.stray_objects = strays
            row.new_bytes, row.shared = by_checkpoint.pop(name, 0), dict(sorted(by_checkpoint.items()))
        elif isinstance(index, Bundle):
            row.status, row.time, row.format = "committed", index_meta.last_modified, FORMAT
            row.size, row.objects = row.size + stored_size(index), row.objects + 1 + index.header.num_shards
            row.stray_objects = strays
        else:
            row.status, row.time, row.problem = "unreadable", index_meta.last_modified, str(index)
            row.size, row.objects = row.size + index_meta.size, row.objects + 1
        rows[name] = row
    for name in listed - set(rows):
        rows[name] = Row(name, "missing", problem="listed in the state file, but its index is gone")
    for row in rows.values():
        row.managed = row.name in listed
        row.preserved = row.name in preserved
    latest = latest_name(storage) if scan.indexes else None
    if latest in rows:
        rows[latest].latest = True
    return [rows[name] for name in sort_names(set(rows))], latest


def _flags(row: Row) -> str:
    flags = [flag for flag, on in (("latest", row.latest), ("preserved", row.preserved),
                                   (row.format, row.format != "cloudckpt")) if on]
    if row.stray_objects:
        flags.append(f"+{row.stray_objects} stray")
    if row.shared:
        flags.append(f"reuses {human_size(sum(row.shared.values()))} of {','.join(row.shared)}")
    if row.kept_for and row.status != "evicted":  # a replaced write's objects that later saves reuse
        flags.append(f"older data kept for {','.join(row.kept_for)}")
    return ",".join(flags)


def _description(row: Row) -> str:
    """The last column: a committed checkpoint's metadata, otherwise what the row is."""
    if row.status == "committed":
        return _short_metadata(row.metadata)
    if row.status == "evicted":
        return (f"data kept for {', '.join(row.kept_for)} (they read {human_size(row.kept_bytes)} "
                f"of its {human_size(row.kept_size)})")
    return (row.problem or "")[:80]


def _short_metadata(metadata: dict[str, Any], width: int = 60) -> str:
    if not metadata:
        return ""
    text = json.dumps(metadata, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def run(args: Any) -> int:
    url = args.url.rstrip("/") or args.url
    storage = open_directory(url)
    scan = scan_directory(storage)
    rows, latest = collect_rows(storage, scan)
    if args.json:
        print_json({"directory": storage.url, "latest": latest, "state_file": scan.has_state,
                    "stored_bytes": _stored(rows), "checkpoints": [row.to_json() for row in rows],
                    "subdirectories": sorted(scan.subdirectories)})
        if not rows:
            raise no_checkpoints_error(storage.url, scan)
        return 0
    if not rows:
        raise no_checkpoints_error(storage.url, scan)
    table = [["NUMBER", "NAME", "STATUS", "STORED", "OBJECTS", "TIME (UTC)", "FLAGS", "METADATA"]]
    for row in rows:
        number = checkpoint_number(row.name)
        table.append([str(number) if number is not None else "-", row.name, row.status,
                      human_size(row.size) if row.status != "missing" else "-",
                      str(row.objects) if row.status != "missing" else "-", human_time(row.time), _flags(row),
                      _description(row)])
    print_table(table)
    counts = {status: sum(1 for r in rows if r.status == status) for status in _STATUSES}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n or status == "committed")
    print(f"\n{summary}; {human_size(_stored(rows))} stored in {storage.url}"
          f"{'' if latest else '; no latest checkpoint'}")
    return 0


#: Row statuses, in the order the summary line counts them.
_STATUSES = ("committed", "evicted", "incomplete", "unreadable", "missing")


def _stored(rows: list[Row]) -> int:
    """Bytes stored in the directory's checkpoints: every object belongs to one row, so each counts once."""
    return sum(r.size for r in rows)
