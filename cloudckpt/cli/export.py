"""``cloudckpt export URL/ckpt-N OUT.npz [KEY...]``: print what :func:`cloudckpt.tools.export` wrote;
with ``--format safetensors``, what :func:`cloudckpt.tools.export_hf.export_hf` wrote into the directory OUT;
with ``--format torch-dcp``, what :func:`cloudckpt.tools.export_torch_dcp.export_torch_dcp` wrote there."""

from __future__ import annotations

from typing import Any

from cloudckpt.cli.common import EXIT_USAGE, CliError, human_size, progress_bars
from cloudckpt.tools.export import export


def run(args: Any) -> int:
    if getattr(args, "format", None) == "safetensors":
        return _run_hf(args)
    if getattr(args, "format", None) == "torch-dcp":
        return _run_torch_dcp(args)
    report = export(args.url, args.out, args.keys, force=args.force, progress=progress_bars(enabled=not args.quiet))
    skipped = f"; skipped {len(report.skipped)}" if report.skipped else ""
    if report.format == "cloudckpt":
        summary = f"{report.arrays} arrays, {report.values} values, {human_size(report.bytes)} of array data"
    else:
        summary = f"{report.arrays} tensors, {human_size(report.bytes)} of numeric data"
    print(f"wrote {report.path}: {summary}{skipped}")
    return 0


def _run_hf(args: Any) -> int:
    from cloudckpt.tools.export_hf import DEFAULT_MAX_SHARD_SIZE, export_hf

    if args.keys:
        raise CliError("--format safetensors selects with --prefix, not KEY arguments", EXIT_USAGE)
    report = export_hf(args.url, args.out, prefix=args.prefix, strip_prefix=args.strip_prefix,
                       max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE, force=args.force,
                       progress=progress_bars(enabled=not args.quiet))
    skipped = f"; skipped {len(report.skipped)}" if report.skipped else ""
    print(f"wrote {report.directory}: {len(report.shards)} shards, {report.tensors} tensors, "
          f"{human_size(report.bytes)}{skipped}")
    return 0


def _run_torch_dcp(args: Any) -> int:
    from cloudckpt.tools.export_torch_dcp import export_torch_dcp

    report = export_torch_dcp(args.url, args.out, args.keys, force=args.force)
    print(f"wrote {report.path}: torch DCP FileSystemWriter layout, {report.arrays} tensors, {report.values} "
          f"other items, {human_size(report.bytes)} of tensor data")
    return 0
