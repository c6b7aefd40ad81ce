"""``cloudckpt verify URL``: print what :func:`cloudckpt.tools.verify` finds, and exit 1 on damage."""

from __future__ import annotations

from typing import Any

from cloudckpt.cli.common import EXIT_DAMAGED, EXIT_OK, fail, human_size, print_json, progress_bars
from cloudckpt.storage import Storage
from cloudckpt.tools.verify import CheckpointVerdict, verify
from cloudckpt.tools.verify import verify_checkpoint as _verify_checkpoint


def verify_checkpoint(storage: Storage, name: str, *, show_progress: bool) -> CheckpointVerdict:
    """One checkpoint's verdict, with a progress bar when ``show_progress`` (tests call this)."""
    return _verify_checkpoint(storage, name, progress=progress_bars(enabled=show_progress))


def run(args: Any) -> int:
    result = verify(args.url, latest=args.latest, progress=progress_bars(enabled=not args.quiet))
    reports, damaged, notes = result.checkpoints, result.damaged, result.directory_problems
    if args.json:
        print_json(result.to_json())
    else:
        for report in reports:
            if report.intact:
                print(f"OK      {report.url}  ({report.arrays} arrays, {report.objects} data objects, "
                      f"{human_size(report.bytes)})")
            else:
                print(f"DAMAGED {report.url}  ({len(report.problems)} problem(s))")
                for problem in report.problems:
                    print(f"  - {problem.line()}")
        for note in notes:
            print(f"DAMAGED {note}")
        print(f"{len(reports)} checkpoint(s) verified: {len(reports) - len(damaged)} intact, {len(damaged)} damaged")
    if damaged or notes:
        if not args.json:
            fail(f"{len(damaged)} damaged checkpoint(s)" + (f", {len(notes)} directory problem(s)" if notes else ""))
        return EXIT_DAMAGED
    return EXIT_OK
