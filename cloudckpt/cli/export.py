"""``cloudckpt export URL/ckpt-N OUT.npz [KEY...]``: print what :func:`cloudckpt.tools.export` wrote."""

from __future__ import annotations

from typing import Any

from cloudckpt.cli.common import human_size, progress_bars
from cloudckpt.tools.export import export


def run(args: Any) -> int:
    report = export(args.url, args.out, args.keys, force=args.force, progress=progress_bars(enabled=not args.quiet))
    skipped = f"; skipped {len(report.skipped)}" if report.skipped else ""
    if report.format == "cloudckpt":
        summary = f"{report.arrays} arrays, {report.values} values, {human_size(report.bytes)} of array data"
    else:
        summary = f"{report.arrays} tensors, {human_size(report.bytes)} of numeric data"
    print(f"wrote {report.path}: {summary}{skipped}")
    return 0
