"""Incremental saves (issue 15): time and bytes of a managed save with 0/10/50/100 % of the state
changed, against a full save of the same state in the same run, on local disk and SeaweedFS.

For each backend and fraction, in a fresh directory, a ``CheckpointManager`` saves once (the
base), then ``--repeat`` rounds of: change the fraction's arrays in place (``+= 1``), time an
incremental save; change them again, time a full save (``save(incremental=False)``). The best of
each counts. Bytes uploaded come from the save's own stats (``SaveStats.bytes`` = what the save
wrote, ``reused_bytes`` = what it referenced). The last checkpoint is restored and compared value
for value (untimed). Also printed: the XXH3-128 cost over the whole state (what every managed
save pays, changed or not), as a share of the full save.

``python -m bench incremental [--size-mib 1024] [--repeat 2] [--backends local,s3]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.bench_checkpoint import (
    MiB,
    State,
    describe_run,
    make_state,
    s3_server,
    state_bytes,
    use_bench_credentials,
    verify,
)

FRACTIONS = (0.0, 0.1, 0.5, 1.0)


@dataclass
class Row:
    backend: str
    fraction: float
    changed_bytes: int
    full_seconds: float
    incremental_seconds: float
    full_uploaded: int
    incremental_uploaded: int
    incremental_reused: int


def changing(state: State, fraction: float) -> list[str]:
    """Keys whose arrays make up about ``fraction`` of the bytes (largest first, deterministic)."""
    total = state_bytes(state)
    chosen: list[str] = []
    size = 0
    for key in sorted(state, key=lambda k: (-state[k].nbytes, k)):
        if size >= fraction * total - 1:
            break
        if size + state[key].nbytes <= fraction * total * 1.02 or not chosen:
            chosen.append(key)
            size += state[key].nbytes
    return chosen if fraction > 0 else []


def run_backend(backend: str, state: State, root: str, repeat: int) -> list[Row]:
    import cloudckpt

    rows = []
    for fraction in FRACTIONS:
        keys = changing(state, fraction)
        directory = f"{root}/f{int(fraction * 100)}-{uuid.uuid4().hex[:6]}"
        ckpt = cloudckpt.Checkpoint(s=state)
        manager = cloudckpt.CheckpointManager(ckpt, directory, max_to_keep=2, leftover_min_age=None)
        manager.save()
        best_full = best_incr = float("inf")
        full_up = incr_up = reused = 0
        for _ in range(repeat):
            for key in keys:
                state[key] += 1
            start = time.perf_counter()
            manager.save()
            elapsed = time.perf_counter() - start
            stats = ckpt.last_save_stats
            assert stats is not None
            if elapsed < best_incr:
                best_incr, incr_up, reused = elapsed, stats.bytes, stats.reused_bytes
            for key in keys:
                state[key] += 1
            start = time.perf_counter()
            manager.save(incremental=False)
            elapsed = time.perf_counter() - start
            stats = ckpt.last_save_stats
            assert stats is not None
            if elapsed < best_full:
                best_full, full_up = elapsed, stats.bytes
        latest = manager.latest_checkpoint
        assert latest is not None
        dest = {k: np.zeros_like(v) for k, v in state.items()}
        cloudckpt.Checkpoint(s=dest).read(latest).expect_partial()
        verify(dest, state, f"{backend} {fraction:.0%}")
        rows.append(Row(backend, fraction, sum(state[k].nbytes for k in keys), best_full, best_incr, full_up,
                        incr_up, reused))
        print(f"  {backend} {fraction:4.0%}: full {best_full:.3f} s, incremental {best_incr:.3f} s", flush=True)
    return rows


def hash_seconds(state: State) -> float:
    from cloudckpt.format.content_hash import content_hash

    start = time.perf_counter()
    for array in state.values():
        content_hash([array.reshape(-1).view(np.uint8).data])
    return time.perf_counter() - start


def report(rows: list[Row], size: int, hashing: float) -> str:
    lines = ["| backend | changed | full save s | incremental save s | speedup (full / incr.) | uploaded full "
             "| uploaded incr. | reused |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.backend} | {r.fraction:.0%} ({r.changed_bytes / MiB:.0f} MiB) | {r.full_seconds:.3f} | "
                     f"{r.incremental_seconds:.3f} | **{r.full_seconds / r.incremental_seconds:.2f}x** | "
                     f"{r.full_uploaded / MiB:.1f} MiB | {r.incremental_uploaded / MiB:.1f} MiB | "
                     f"{r.incremental_reused / MiB:.1f} MiB |")
    fulls = [r.full_seconds for r in rows if r.fraction == 1.0]
    share = f" = {hashing / min(fulls):.1%} of the fastest full save with 100 % changed" if fulls else ""
    lines.append(f"\nXXH3-128 over the whole state ({size / MiB:.0f} MiB): {hashing:.3f} s{share} "
                 "(every managed save pays it, full or incremental; a plain Checkpoint.write does not)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench incremental", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.repeat = 64, 1
    use_bench_credentials()
    print(describe_run(), flush=True)
    state = make_state(args.size_mib * MiB)
    size = state_bytes(state)
    print(f"{len(state)} float32 arrays, {size / MiB:.1f} MiB", flush=True)
    backends = [b for b in args.backends.split(",") if b]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-incr-") as tmp:
        if "local" in backends:
            rows += run_backend("local", state, str(Path(tmp) / "local"), args.repeat)
        if "s3" in backends:
            import boto3

            with s3_server(Path(tmp)) as endpoint:
                os.environ["AWS_ENDPOINT_URL"] = endpoint
                bucket = f"bench-incr-{uuid.uuid4().hex[:8]}"
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
                rows += run_backend("s3", state, f"s3://{bucket}/run", args.repeat)
        hashing = min(hash_seconds(state) for _ in range(2))
    print()
    print(report(rows, size, hashing))
    print(f"\n{describe_run()} (at the end)")
    return 0
