"""Resharding restore in one process: an array stored as an n x n grid of chunks, restored onto
n*n one-row shards (every new shard cuts a row out of n stored chunks) and onto 8 row strips.

What it shows: how many bytes a restore reads per byte of the array (1.00 = every stored byte
once; before a stored range was shared between the targets that need it, the one-row case read
each chunk n times) and how long planning + reading + verifying takes, on local disk (page
cache). Every restore is compared with the array, untimed.

``python -m bench reshard [--grid 64] [--size 4096] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_checkpoint import describe_run
from cloudckpt import UNSHARDED, Checkpoint, Layout, Mesh, ShardedArray
from cloudckpt.coordination import LocalCoordinator
from cloudckpt.restoring import array_reads as reader
from cloudckpt.storage import ReadRequest, Storage


def restore_once(path: str, shape: tuple[int, int], devices: int) -> tuple[float, int, np.ndarray[Any, Any]]:
    """Seconds and bytes read of one restore onto ``devices`` row shards, and the array it gave."""
    read: list[int] = []
    real = reader.read_coalesced

    def counting(storage: Storage, requests: Sequence[ReadRequest]) -> None:
        read.append(sum(r.out.nbytes for r in requests))
        real(storage, requests)

    reader.read_coalesced = counting
    try:
        target = ShardedArray(shape, np.float32, Layout(["m", UNSHARDED], Mesh(("m",), (devices,),
                                                                              coordinator=LocalCoordinator())))
        started = time.perf_counter()
        Checkpoint(w=target).read(path).expect_partial()
        seconds = time.perf_counter() - started
    finally:
        reader.read_coalesced = real
    return seconds, sum(read), target.to_numpy()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="stored chunks per dimension (default 64)")
    parser.add_argument("--size", type=int, default=4096, help="rows = columns of the float32 array (default 4096)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per case; the best counts")
    args = parser.parse_args(argv)
    n, size = args.grid, args.size
    if size < n * n:
        parser.error(f"--size {size} must be at least grid^2 = {n * n} (one row per new shard)")
    print(describe_run(), flush=True)
    g = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-reshard-") as tmp:
        grid = Mesh(("x", "y"), (n, n), coordinator=LocalCoordinator())
        path = Checkpoint(w=ShardedArray.from_global(g, Layout(["x", "y"], grid))).write(Path(tmp) / "c")
        print(f"{size} x {size} float32 ({g.nbytes / 2**20:.0f} MiB) stored as {n} x {n} chunks of "
              f"{g.nbytes // (n * n) / 1024:.0f} KiB; best of {args.repeat}")
        print("| restored onto | new shards | best s | bytes read / array bytes |")
        print("|---|---:|---:|---:|")
        for label, devices in ((f"{n * n} row shards (each cuts {n} stored chunks)", n * n), ("8 row strips", 8)):
            runs = [restore_once(path, g.shape, devices) for _ in range(args.repeat)]
            for _, _, restored in runs:
                if not np.array_equal(restored, g):
                    raise SystemExit(f"{label}: the restored array differs")
            best = min(seconds for seconds, _, _ in runs)
            print(f"| {label} | {devices} | {best:.2f} | {runs[0][1] / g.nbytes:.2f} |", flush=True)
    print(f"{describe_run()} (at the end)")
    return 0
