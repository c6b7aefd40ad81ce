"""``cloudckpt ls URL``: the checkpoints in a directory, committed or not, and which is latest.

One LIST of the directory finds every index and data object; each index is then read
(in parallel) for its object sizes and user metadata, and the state file for what the
manager keeps. "incomplete" rows are saves that never committed - no index, only data
objects - which ``cloudckpt gc`` removes once they are old enough.
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
    status: str  # committed | incomplete | unreadable | missing
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

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "number": checkpoint_number(self.name), "status": self.status,
                "size": self.size, "objects": self.objects, "time": iso_time(self.time),
                "metadata": self.metadata, "latest": self.latest, "preserved": self.preserved,
                "managed": self.managed, "stray_objects": self.stray_objects, "problem": self.problem,
                "new_bytes": self.new_bytes, "shared_bytes": self.shared, "format": self.format}


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


def collect_rows(storage: Storage, scan: DirectoryScan) -> tuple[list[Row], str | None]:
    """Every checkpoint name in the directory as a row, and the latest one's name."""
    state = read_state_quietly(storage) if scan.has_state else None
    listed = set(state.all_model_checkpoint_paths) if state else set()
    preserved = set(state.preserved) if state else set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = dict(zip(scan.indexes, pool.map(lambda n: _load(storage, n), scan.indexes), strict=True))
    rows: dict[str, Row] = {}
    for name in scan.names:
        data = scan.data.get(name, [])
        index_meta = scan.indexes.get(name)
        index = loaded.get(name)
        if index_meta is None:
            stamps = [m.last_modified for m in data if m.last_modified]
            rows[name] = Row(name, "incomplete", size=sum(m.size for m in data), objects=len(data),
                             time=max(stamps) if stamps else None)
        elif isinstance(index, CheckpointIndex):
            named = {o.name for o in index.objects}
            by_checkpoint = index.bytes_by_checkpoint()
            rows[name] = Row(name, "committed", size=index_meta.size + sum(o.size for o in index.objects),
                             objects=1 + len(index.objects), time=index_meta.last_modified,
                             metadata=dict(index.metadata),
                             stray_objects=sum(1 for m in data if m.key not in named),
                             new_bytes=by_checkpoint.pop(name, 0), shared=dict(sorted(by_checkpoint.items())))
        elif isinstance(index, Bundle):
            rows[name] = Row(name, "committed", size=stored_size(index), objects=1 + index.header.num_shards,
                             time=index_meta.last_modified, format=FORMAT)
        else:
            rows[name] = Row(name, "unreadable", size=index_meta.size + sum(m.size for m in data),
                             objects=1 + len(data), time=index_meta.last_modified, problem=str(index))
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
        flags.append(f"{human_size(sum(row.shared.values()))} shared ({','.join(row.shared)})")
    return ",".join(flags)


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
                    "checkpoints": [row.to_json() for row in rows],
                    "subdirectories": sorted(scan.subdirectories)})
        if not rows:
            raise no_checkpoints_error(storage.url, scan)
        return 0
    if not rows:
        raise no_checkpoints_error(storage.url, scan)
    table = [["NUMBER", "NAME", "STATUS", "SIZE", "OBJECTS", "TIME (UTC)", "FLAGS", "METADATA"]]
    for row in rows:
        number = checkpoint_number(row.name)
        table.append([str(number) if number is not None else "-", row.name, row.status,
                      human_size(row.size) if row.status != "missing" else "-",
                      str(row.objects) if row.status != "missing" else "-", human_time(row.time), _flags(row),
                      _short_metadata(row.metadata) if row.status == "committed" else (row.problem or "")[:80]])
    print_table(table)
    committed = sum(1 for r in rows if r.status == "committed")
    total = sum(r.size for r in rows)
    print(f"\n{committed} committed, {len(rows) - committed} other; {human_size(total)} in {storage.url}"
          f"{'' if latest else '; no latest checkpoint'}")
    return 0
