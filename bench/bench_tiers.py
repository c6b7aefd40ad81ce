"""``python -m bench tiers``: the local tier against the bucket tier, and against the limits (issue 28).

Two gloo processes on 127.0.0.1 (two "hosts", failure domains host0/host1, ``replicas=1``) hold
a float32 state sharded over both; the local tier lives on tmpfs (``/dev/shm``) when there is
one, the bucket is SeaweedFS on 127.0.0.1. Measured, best of ``--repeat``, the slower rank
counting (every step is collective):

- caller-blocked time and time until the save is safe: a local save (blocked until it is on
  each host and its replica - safe against one host lost), a bucket save (sync: blocked until
  committed), an async bucket save (blocked for the snapshot; safe at ``sync()``);
- time to resume after host 1 is replaced (its local directory wiped): served by the local
  tier (host 1 fetches its shard from host 0 over gloo; 0 bucket reads) vs by the bucket
  (every local tier wiped), on the same step;
- the limits: writing one host's shard bytes to a tmpfs file (memcpy into the page cache),
  and a gloo transfer of the same bytes between the two processes.

Targets (issue 28): a local-tier resume >= 5x faster than the bucket resume, and within 2x
of (gloo transfer + tmpfs write) of the replaced host's bytes.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_checkpoint import describe_run
from bench.bench_distributed import seaweedfs_bucket
from cloudckpt.testing.processes import spawn_reports

MiB = 1024 * 1024
COLUMNS = 1024
LOCAL_SAVE = "local save: blocked = safe on host + replica"
BUCKET_SAVE = "bucket save (sync): blocked = safe in bucket"


def _local_root() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="cloudckpt-bench-tiers-", dir=shm if shm.is_dir() else None))


def worker(rank: int, world: int, port: int, config: dict[str, Any], report: dict[str, Any]) -> None:
    import torch.distributed as dist

    from cloudckpt import (
        UNSHARDED,
        CheckpointManager,
        CheckpointOptions,
        DTensorCheckpoint,
        Layout,
        LocalTier,
        Mesh,
        ShardedArray,
    )
    from cloudckpt.coordination import TorchCoordinator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    coordinator = TorchCoordinator(timeout=600)
    mesh = Mesh(["x"], [world], coordinator=coordinator)
    rows = config["size_bytes"] // (4 * COLUMNS)
    root = Path(config["local_root"])
    mine = root / f"host{rank}"
    bucket = f"s3://{config['bucket']}/run"

    def job() -> tuple[Any, Any]:
        w = ShardedArray((rows, COLUMNS), np.float32, Layout(["x", UNSHARDED], mesh))
        tier = LocalTier(mine, replicas=1, max_to_keep=2, failure_domain=f"host{rank}")
        manager = CheckpointManager(DTensorCheckpoint(mesh, W=w), bucket, max_to_keep=2, local_tier=tier,
                                    incremental=False)  # every save uploads its bytes: the state changes in training
        return manager, w

    def timed(fn: Any) -> float:
        dist.barrier()
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
        # On the job's default group: the checkpoint group may be busy with a background save.
        times: list[Any] = [None] * world
        dist.all_gather_object(times, seconds)
        return float(max(times))  # the slower rank decides a collective step

    manager, w = job()
    rng = np.random.default_rng(rank)
    for shard in w.local_shards:
        shard[...] = rng.standard_normal(shard.shape, dtype=np.float32)
    expected = [s.copy() for s in w.local_shards]
    best: dict[str, float] = {}

    def keep(label: str, seconds: float) -> None:
        best[label] = min(best.get(label, float("inf")), seconds)

    step = 0
    async_options = CheckpointOptions(enable_async=True)
    for _ in range(config["repeat"]):
        step += 1
        keep(LOCAL_SAVE, timed(functools.partial(manager.save, checkpoint_number=step, tier="local")))
        keep(BUCKET_SAVE, timed(functools.partial(manager.save, checkpoint_number=step)))
        step += 1
        blocked = timed(functools.partial(manager.save, checkpoint_number=step, options=async_options))
        keep("bucket save (async): blocked", blocked)
        keep("bucket save (async): safe in bucket (at sync)", blocked + timed(manager.sync))
    step += 1
    manager.save(checkpoint_number=step, tier="local")
    manager.save(checkpoint_number=step)  # both tiers hold the newest step

    def resume(label: str) -> None:
        fresh, w2 = job()
        path = fresh.restore_or_initialize()
        if not all(np.array_equal(a, b) for a, b in zip(w2.local_shards, expected, strict=True)):
            raise AssertionError(f"{label}: restored values differ")
        report.setdefault("paths", {})[label] = path

    for _ in range(config["repeat"]):
        if rank == 1:
            shutil.rmtree(mine)  # the replacement VM's empty disk
        keep("resume, host 1 replaced: local tier", timed(lambda: resume("local")))
    shard = np.ascontiguousarray(w.local_shards[0]).view(np.uint8).reshape(-1)
    report["shard_bytes"] = int(shard.nbytes)

    def write_tmpfs(target: Path) -> None:
        with open(target, "wb") as f:
            f.write(shard.data)

    for _ in range(config["repeat"]):
        target = root / f"limit-{rank}.bin"
        keep("limit: write one host's shard to tmpfs", timed(functools.partial(write_tmpfs, target)))
        target.unlink()
        incoming = {0: [np.empty_like(shard)]} if rank == 1 else {}
        keep("limit: gloo transfer of one host's shard", timed(
            lambda: coordinator.transfer(1, [shard] if rank == 0 else [], incoming)))  # noqa: B023
    for _ in range(config["repeat"]):
        shutil.rmtree(mine, ignore_errors=True)  # every local tier gone
        keep("resume, host 1 replaced: bucket", timed(lambda: resume("bucket")))
    report["best"] = best


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tiers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="global state size (default 512)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 MiB")
    parser.add_argument("--repeat", type=int, default=2, help="runs per path; the best counts (default 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound on the spawn, seconds")
    args = parser.parse_args(argv)
    size = (32 if args.quick else args.size_mib) * MiB
    print(describe_run(), flush=True)
    root = _local_root()
    try:
        with seaweedfs_bucket("tiers") as (_, bucket):
            config = {"bucket": bucket, "size_bytes": size, "repeat": args.repeat, "local_root": str(root)}
            reports = spawn_reports(worker, 2, config, timeout=args.timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best, shard = reports[0]["best"], reports[0]["shard_bytes"]
    print(f"\n{size / MiB:.0f} MiB float32 sharded over 2 gloo processes (replicas=1), local tier on "
          f"{'tmpfs' if str(root).startswith('/dev/shm') else 'disk'}, bucket: SeaweedFS on 127.0.0.1, "
          f"best of {args.repeat}; restored from: {reports[1]['paths']}")
    print("\n| step | seconds | MiB/s (state) |\n|---|---:|---:|")
    for label, seconds in best.items():
        per = shard if label.startswith("limit") else size
        print(f"| {label} | {seconds:.3f} | {per / MiB / seconds:.0f} |")
    local, bucket_resume = best["resume, host 1 replaced: local tier"], best["resume, host 1 replaced: bucket"]
    limit = best["limit: gloo transfer of one host's shard"] + best["limit: write one host's shard to tmpfs"]
    print(f"\nresume: bucket / local tier = {bucket_resume / local:.1f}x (target >= 5x); local tier / "
          f"(gloo transfer + tmpfs write of the replaced host's {shard / MiB:.0f} MiB) = {local / limit:.1f}x "
          f"(target <= 2x)")
    print(f"save, caller blocked: bucket sync / local = {best[BUCKET_SAVE] / best[LOCAL_SAVE]:.1f}x; "
          f"async bucket blocked / local = {best['bucket save (async): blocked'] / best[LOCAL_SAVE]:.2f}x")
    print(describe_run() + " (at the end)")
    return 0
