"""Storage benchmark: cloudckpt's backends against what users would otherwise write.

Uploads and downloads the same random bytes, in one run, through:
- S3 (SeaweedFS on loopback): cloudckpt ``S3Storage``; one boto3 ``put_object`` /
  ``get_object``; boto3's ``TransferManager`` with its default config; ``s3fs``.
- local disk: cloudckpt ``LocalStorage`` (temp file + fsync + rename); a plain
  sequential ``write`` + ``fsync`` / ``read``.
Each path runs ``--repeat`` times; the best run counts (the machine is noisy, the best
run is the one least disturbed). Ratios are against the best peer, not the slowest.

``--sweep`` also measures cloudckpt's S3 path over part sizes and concurrencies; that
table is how the defaults in ``TransferConfig`` were chosen.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.bench_checkpoint import use_bench_credentials
from cloudckpt.storage import ReadRequest, TransferConfig, open_storage

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    target: str
    direction: str
    path: str
    seconds: float
    size: int
    ours: bool

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds


def best_of(repeat: int, fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    """Best wall time of ``repeat`` runs of ``fn`` (``before`` runs untimed each time)."""
    best = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        gc.collect()
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench_local(data: np.ndarray, repeat: int, workdir: Path) -> list[Result]:
    size = data.nbytes
    store = open_storage(workdir / "cloudckpt")
    plain = workdir / "plain.bin"
    out = np.empty_like(data)

    def plain_write() -> None:
        with open(plain, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())

    def plain_read() -> None:
        with open(plain, "rb") as f:
            f.readinto(memoryview(out))

    # Warm-up, untimed: the first large write of a run pays for page-cache eviction and
    # writeback of whatever came before (seen as a 5x outlier on whichever path ran first).
    plain_write()
    store.put("obj", data)
    results = [
        Result("local", "write", "cloudckpt LocalStorage.put (fsync)", best_of(repeat, lambda: store.put("obj", data)),
               size, True),
        Result("local", "write", "plain write + fsync", best_of(repeat, plain_write), size, False),
        Result("local", "read", "cloudckpt read_into",
               best_of(repeat, lambda: store.read_into([ReadRequest("obj", 0, memoryview(out))])), size, True),
        Result("local", "read", "plain readinto", best_of(repeat, plain_read), size, False),
    ]
    store.delete("obj")
    plain.unlink()
    return results


def bench_s3(data: np.ndarray, repeat: int, endpoint: str, with_s3fs: bool) -> list[Result]:
    import boto3
    from botocore.config import Config

    size = data.nbytes
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(
        request_checksum_calculation="when_required", response_checksum_validation="when_required"))
    client.create_bucket(Bucket=bucket)
    store = open_storage(f"s3://{bucket}/ours", endpoint_url=endpoint)
    out = np.empty_like(data)
    body = memoryview(data).cast("B")
    results = [
        Result("s3", "upload", "cloudckpt S3Storage.put", best_of(repeat, lambda: store.put("obj", data)), size, True),
        Result("s3", "upload", "boto3 put_object (one PUT)",
               best_of(repeat, lambda: client.put_object(Bucket=bucket, Key="peer/put", Body=body.tobytes())),
               size, False),
        Result("s3", "upload", "boto3 TransferManager (default)",
               best_of(repeat, lambda: client.upload_fileobj(io.BytesIO(body), bucket, "peer/tm")), size, False),
        Result("s3", "download", "cloudckpt read_into",
               best_of(repeat, lambda: store.read_into([ReadRequest("obj", 0, memoryview(out))])), size, True),
        Result("s3", "download", "boto3 get_object (one GET)",
               best_of(repeat, lambda: client.get_object(Bucket=bucket, Key="peer/put")["Body"].read()), size, False),
        Result("s3", "download", "boto3 TransferManager (default)",
               best_of(repeat, lambda: client.download_fileobj(bucket, "peer/tm", io.BytesIO())), size, False),
    ]
    if with_s3fs:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False)
        results += [
            Result("s3", "upload", f"s3fs {s3fs.__version__} pipe",
                   best_of(repeat, lambda: fs.pipe(f"{bucket}/peer/s3fs", body.tobytes())), size, False),
            Result("s3", "download", f"s3fs {s3fs.__version__} cat",
                   best_of(repeat, lambda: fs.cat(f"{bucket}/peer/s3fs")), size, False),
        ]
    return results


def sweep_s3(data: np.ndarray, repeat: int, endpoint: str) -> list[tuple[str, float, float]]:
    """Our S3 path over part size x concurrency (and single request), MiB/s up and down."""
    import boto3

    bucket = f"sweep-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    out = np.empty_like(data)
    rows = []
    grid: list[tuple[str, TransferConfig]] = [
        ("single request", TransferConfig(multipart_threshold=5 * 1024 * MiB, read_chunk_size=5 * 1024 * MiB,
                                          max_concurrency=1)),
    ]
    for part in (16, 32, 64, 128):
        for workers in (2, 4, 8):
            grid.append((f"{part} MiB x {workers}", TransferConfig(
                multipart_threshold=part * MiB, part_size=part * MiB, read_chunk_size=part * MiB,
                max_concurrency=workers)))
    for label, config in grid:
        store = open_storage(f"s3://{bucket}/sweep", endpoint_url=endpoint, config=config)
        up = best_of(repeat, lambda store=store: store.put("obj", data))
        down = best_of(repeat, lambda store=store: store.read_into([ReadRequest("obj", 0, memoryview(out))]))
        rows.append((label, data.nbytes / MiB / up, data.nbytes / MiB / down))
        print(f"  sweep {label:>16}: up {rows[-1][1]:7.1f} MiB/s  down {rows[-1][2]:7.1f} MiB/s", flush=True)
        store.close()
    return rows


def report(results: list[Result]) -> str:
    lines = ["| target | direction | path | MiB/s | ours / best peer |", "|---|---|---|---:|---:|"]
    for (target, direction) in dict.fromkeys((r.target, r.direction) for r in results):
        group = [r for r in results if (r.target, r.direction) == (target, direction)]
        best_peer = max((r.mib_s for r in group if not r.ours), default=float("nan"))
        for r in group:
            ratio = f"**{r.mib_s / best_peer:.2f}x**" if r.ours else ""
            lines.append(f"| {target} | {direction} | {r.path} | {r.mib_s:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench storage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="object size (default 1024 = 1 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the best counts")
    parser.add_argument("--targets", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--sweep", action="store_true", help="also sweep S3 part size x concurrency")
    parser.add_argument("--no-s3fs", action="store_true", help="skip the s3fs peer (if not installed)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    import servers  # the same launcher the tests use: 127.0.0.1, stopped by PID

    use_bench_credentials()
    print(f"generating {args.size_mib} MiB of random bytes ...", flush=True)
    data = np.random.default_rng(0).integers(0, 256, args.size_mib * MiB, dtype=np.uint8)
    targets = set(args.targets.split(","))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-", dir=REPO) as tmp:
        if "local" in targets:
            print("local disk ...", flush=True)
            results += bench_local(data, args.repeat, Path(tmp))
        if "s3" in targets:
            with servers.seaweedfs(Path(tmp) / "weed") as server:
                print(f"SeaweedFS at {server.endpoint} ...", flush=True)
                results += bench_s3(data, args.repeat, server.endpoint, with_s3fs=not args.no_s3fs)
                if args.sweep:
                    sweep_s3(data, args.repeat, server.endpoint)
    print()
    print(f"{args.size_mib} MiB, best of {args.repeat}, {os.cpu_count()} cores")
    print(report(results))
    return 0
