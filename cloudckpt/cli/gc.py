"""``cloudckpt gc URL``: print what :func:`cloudckpt.tools.collect_garbage` finds (with ``--yes``, removes).

A dry run is the default because deleting is the one thing here that cannot be undone.
"""

from __future__ import annotations

from typing import Any

from cloudckpt.cli.common import EXIT_FAILED, EXIT_OK, fail, human_age, human_size, print_json, print_table
from cloudckpt.tools.gc import collect_garbage


def run(args: Any) -> int:
    report = collect_garbage(args.url, args.min_age, delete=args.yes)
    found, removal = report.leftovers, report.removal
    if args.json:
        print_json(report.to_json(dry_run=not args.yes))
    elif not found:
        print(f"nothing to clean in {report.directory} (nothing left by crashed saves is older than "
              f"{human_age(args.min_age)})")
    else:
        table = [["KIND", "KEY", "SIZE", "AGE"]]
        table += [[item.kind, item.key, human_size(item.size), human_age(item.age)] for item in found]
        print_table(table)
        if removal is None:
            print(f"\n{len(found)} leftover(s), {human_size(report.known_bytes)}, older than "
                  f"{human_age(args.min_age)} in {report.directory}; dry run: run again with --yes to delete them")
        else:
            print(f"\nremoved {removal.removed} of {len(found)} leftover(s), {human_size(removal.bytes)} freed")
    if report.failed_urls:
        for url, error in report.failed_urls:
            fail(f"could not remove {url}: {error}")
        return EXIT_FAILED
    return EXIT_OK
