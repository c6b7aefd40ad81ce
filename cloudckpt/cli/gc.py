"""``cloudckpt gc URL``: list, and with ``--yes`` delete, what crashed saves left in a directory.

All the judgement lives in ``cloudckpt.leftovers`` (the same code a manager's first save
runs): what counts as a leftover, ages by the store's clock, re-checking each data object
against its index right before deleting it. This module only presents it. A dry run is
the default because deleting is the one thing here that cannot be undone.
"""

from __future__ import annotations

from typing import Any

from cloudckpt.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    fail,
    human_age,
    human_size,
    open_directory,
    print_json,
    print_table,
)
from cloudckpt.leftovers import find_leftovers, remove_leftovers


def run(args: Any) -> int:
    storage = open_directory(args.url.rstrip("/") or args.url)
    found = find_leftovers(storage, min_age=args.min_age)
    known = sum(item.size or 0 for item in found)
    removal = remove_leftovers(storage, found) if args.yes and found else None
    if args.json:
        print_json({"directory": storage.url, "min_age_seconds": args.min_age.total_seconds(), "dry_run": not args.yes,
                    "leftovers": [{"kind": item.kind, "key": item.key, "size": item.size,
                                   "age_seconds": item.age.total_seconds(), "upload_id": item.upload_id}
                                  for item in found],
                    "removed": removal.removed if removal else 0, "bytes_freed": removal.bytes if removal else 0,
                    "failed": [{"key": key, "error": error} for key, error in removal.failed] if removal else []})
    elif not found:
        print(f"nothing to clean in {storage.url} (nothing left by crashed saves is older than "
              f"{human_age(args.min_age)})")
    else:
        table = [["KIND", "KEY", "SIZE", "AGE"]]
        table += [[item.kind, item.key, human_size(item.size), human_age(item.age)] for item in found]
        print_table(table)
        if removal is None:
            print(f"\n{len(found)} leftover(s), {human_size(known)}, older than {human_age(args.min_age)} "
                  f"in {storage.url}; dry run: run again with --yes to delete them")
        else:
            print(f"\nremoved {removal.removed} of {len(found)} leftover(s), {human_size(removal.bytes)} freed")
    if removal is not None and removal.failed:
        for key, error in removal.failed:
            fail(f"could not remove {storage.url_for(key)}: {error}")
        return EXIT_FAILED
    return EXIT_OK
