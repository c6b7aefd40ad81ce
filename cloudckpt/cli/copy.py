"""``cloudckpt cp SRC DST``: print what :func:`cloudckpt.tools.copy` copies, as it copies it.

The order that makes an interrupted copy harmless, the re-read and the commit are the
library's (``cloudckpt.tools.copy``); this module maps the options onto it and prints one
line per checkpoint, the damaged ones on stderr, and exits 1 when something was skipped.
"""

from __future__ import annotations

from typing import Any

from cloudckpt.cli.common import EXIT_DAMAGED, fail, human_size, progress_bars
from cloudckpt.format.state_file import STATE_KEY
from cloudckpt.storage import Storage
from cloudckpt.tools.copy import Copied, Damaged, copy
from cloudckpt.tools.copy import copy_checkpoint as _copy_checkpoint


def copy_checkpoint(src: Storage, src_name: str, dst: Storage, dst_name: str, *, force: bool, reread: bool,
                    quiet: bool, ranged: bool = True) -> Copied:
    """One checkpoint's copy with progress bars unless ``quiet`` (tests call this)."""
    return _copy_checkpoint(src, src_name, dst, dst_name, force=force, reread=reread,
                            progress=progress_bars(enabled=not quiet), ranged=ranged)


def _report(result: Copied) -> None:
    notes = [f"{result.objects} data object{'' if result.objects == 1 else 's'}, {human_size(result.bytes)}"]
    if result.packed:
        notes.append(f"{result.packed} of them only the ranges it reads of a larger object")
    if result.present:
        notes.append(f"{result.present} shared already there")
    if result.verified:
        notes.append("re-read and verified")
    print(f"copied {result.src} -> {result.dst}  ({'; '.join(notes)})")


def _report_damaged(damaged: Damaged) -> None:
    fail(f"not copied, damaged: {damaged.url}: {damaged.reason}")


def run(args: Any) -> int:
    report = copy(args.src, args.dst, force=args.force, reread=not args.no_reread, part_size=args.part_size,
                  progress=progress_bars(enabled=not args.quiet), on_copied=_report, on_damaged=_report_damaged)
    if not report.directory:
        return 0
    for name, kept_for in report.carried_with:
        print(f"{name} (evicted; data kept for {', '.join(kept_for)}): copied with them")
    if report.left:
        print(f"not copied (no index, and no copied checkpoint reads their data): {', '.join(report.left)}")
    damaged = [d.name for d in report.damaged]
    if report.state_copied:
        print(f"copied {report.state_url[0]} -> {report.state_url[1]}"
              f"{' (listing only the checkpoints copied)' if damaged else ''}")
    if report.state_problem is not None:
        fail(f"not copied, damaged: {report.state_problem}")
        damaged.append(STATE_KEY)
    if damaged:
        total = len(report.copied) + len(report.damaged)
        print(f"copied {len(report.copied)} of {total} checkpoints; not copied (damaged): {', '.join(damaged)}")
        return EXIT_DAMAGED
    return 0
