"""``cloudckpt ls URL``: print :func:`cloudckpt.tools.list_checkpoints`'s listing as a table (or ``--json``).

``--local-tier PATH`` adds this host's local tier (``cloudckpt.manager.tiers.list_local_tier``):
each step, whether it is committed there, and whether the bucket has it too.

Sizes are bytes stored, each object counted once, under the checkpoint name its write gave
it: a row's STORED is its index plus the data objects carrying its name, so the rows add up
to the directory's total. Bytes a checkpoint reads from another one's objects are shown
beside it ("reuses 80 B of ckpt-1"), not counted again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from cloudckpt.cli.common import human_size, human_time, iso_time, no_checkpoints_error, print_json, print_table
from cloudckpt.manager.tiers import list_local_tier
from cloudckpt.tools.listing import STATUSES, CheckpointRow, list_checkpoints


def _flags(row: CheckpointRow) -> str:
    flags = [flag for flag, on in (("latest", row.latest), ("preserved", row.preserved),
                                   (row.format, row.format != "cloudckpt")) if on]
    if row.stray_objects:
        flags.append(f"+{row.stray_objects} stray")
    if row.shared:
        flags.append(f"reuses {human_size(sum(row.shared.values()))} of {','.join(row.shared)}")
    if row.kept_for and row.status != "evicted":  # a replaced write's objects that later saves reuse
        flags.append(f"older data kept for {','.join(row.kept_for)}")
    return ",".join(flags)


def _description(row: CheckpointRow) -> str:
    """The last column: a committed checkpoint's metadata, otherwise what the row is."""
    if row.status == "committed":
        return _short_metadata(row.metadata)
    if row.status == "evicted":
        return (f"data kept for {', '.join(row.kept_for)} (they read {human_size(row.kept_bytes)} "
                f"of its {human_size(row.kept_size)})")
    return (row.problem or "")[:80]


def _short_metadata(metadata: Mapping[str, Any], width: int = 60) -> str:
    if not metadata:
        return ""
    text = json.dumps(dict(metadata), separators=(",", ":"), default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


def _row_json(row: CheckpointRow) -> dict[str, Any]:
    return {"name": row.name, "number": row.number, "status": row.status,
            "size": row.size, "objects": row.objects, "time": iso_time(row.time),
            "metadata": dict(row.metadata), "latest": row.latest, "preserved": row.preserved,
            "managed": row.managed, "stray_objects": row.stray_objects, "problem": row.problem,
            "new_bytes": row.new_bytes, "shared_bytes": dict(row.shared), "format": row.format,
            "kept_for": list(row.kept_for), "kept_bytes": row.kept_bytes}


def _local_tier(path: str | None, rows: Sequence[CheckpointRow]) -> list[dict[str, Any]] | None:
    """The local tier's steps (``--local-tier``), each saying whether the bucket has it committed too."""
    if path is None:
        return None
    in_bucket = {row.name for row in rows if row.status == "committed"}
    return [{"name": s.name, "number": s.number, "status": s.status, "size": s.size, "objects": s.objects,
             "hosts": s.hosts, "in_bucket": s.name in in_bucket} for s in list_local_tier(path)]


def _print_local_tier(path: str, steps: list[dict[str, Any]]) -> None:
    table = [["NUMBER", "NAME", "STATUS", "STORED HERE", "OBJECTS", "HOSTS", "TIERS"]]
    for s in steps:
        table.append([str(s["number"]), s["name"], s["status"], human_size(s["size"]), str(s["objects"]),
                      str(s["hosts"] or "-"), "local+bucket" if s["in_bucket"] else "local"])
    print(f"\nlocal tier {path} (this host):")
    print_table(table)


def run(args: Any) -> int:
    listing = list_checkpoints(args.url)
    rows, latest = listing.checkpoints, listing.latest
    local = _local_tier(getattr(args, "local_tier", None), rows)
    if args.json:
        print_json({"directory": listing.directory, "latest": latest, "state_file": listing.state_file,
                    "stored_bytes": listing.stored_bytes, "checkpoints": [_row_json(row) for row in rows],
                    "subdirectories": list(listing.subdirectories),
                    **({"local_tier": local} if local is not None else {})})
        if not rows and not local:
            raise no_checkpoints_error(listing.directory, listing.subdirectories)
        return 0
    if not rows and local:
        print(f"no checkpoints in {listing.directory}")
        _print_local_tier(args.local_tier, local)
        return 0
    if not rows:
        raise no_checkpoints_error(listing.directory, listing.subdirectories)
    table = [["NUMBER", "NAME", "STATUS", "STORED", "OBJECTS", "TIME (UTC)", "FLAGS", "METADATA"]]
    for row in rows:
        number = row.number
        table.append([str(number) if number is not None else "-", row.name, row.status,
                      human_size(row.size) if row.status != "missing" else "-",
                      str(row.objects) if row.status != "missing" else "-", human_time(row.time), _flags(row),
                      _description(row)])
    print_table(table)
    counts = {status: sum(1 for r in rows if r.status == status) for status in STATUSES}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n or status == "committed")
    print(f"\n{summary}; {human_size(listing.stored_bytes)} stored in {listing.directory}"
          f"{'' if latest else '; no latest checkpoint'}")
    if local is not None:
        _print_local_tier(args.local_tier, local)
    return 0
