"""Multi-host benchmark: ``DTensorCheckpoint`` against ``torch.distributed.checkpoint``, on SeaweedFS.

One SeaweedFS (``weed mini`` on 127.0.0.1, stopped by its PID) serves every run. For each
world size (default 1 and 2 - more processes would only measure this 2-core machine's
contention) a real gloo group is spawned (``tcp://127.0.0.1:<free port>``); each rank holds
its shards of the same state: ``--size-mib`` of float32 in total, 12 matrices sharded by
rows over a 1-D mesh of the ranks (``Layout(["x", UNSHARDED])`` for cloudckpt,
``DTensor`` with ``[Shard(0)]`` for DCP - both views share the same memory) plus 4
replicated matrices (1/16 of the bytes; both libraries write each replica once).

Inside the group, with a barrier before and after every timed section (so the time is the
slowest rank's), it measures:

- save: cloudckpt ``DTensorCheckpoint.write`` with per-host writes (the default);
  cloudckpt with ``experimental_io_device`` = rank 0 (world 2 only - at 1 it is the same
  path); ``torch.distributed.checkpoint.save`` with ``FsspecWriter`` over s3fs, with its
  default 1 writer thread and with ``--dcp-threads`` (cloudckpt uploads with 4 threads).
- restore onto the same layout: cloudckpt ``read``; ``dcp.load`` with ``FsspecReader``.

Every restore is checked value for value against the saved shards (untimed), so a path that
restores nothing fails the run. Each path runs ``--repeat`` times, interleaved (a noisy
moment hits one run of every path); the best run counts. After one untimed warm-up save per
library (clients, s3fs session, cloudckpt's one-off conditional-write probe), the first timed
run is not a cold start.

Also reported, for the scaling note in docs/benchmarks.md: objects per checkpoint (cloudckpt
from its index, both from a listing) and S3 requests per save/restore, summed over ranks
(counted by a ``before-call`` hook on each process's boto3 / aiobotocore client).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.bench_checkpoint import describe_run, use_bench_credentials
from cloudckpt.testing.processes import spawn_reports

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
#: Columns of every matrix; rows are multiples of ROW_ALIGN so any world size up to 8 splits evenly.
COLS = 1024
ROW_ALIGN = 8
SHARDED_ARRAYS = 12
REPLICATED_ARRAYS = 4
#: Timeout of the group's collectives (a barrier waits for the slowest upload).
GROUP_TIMEOUT = 600.0


# --------------------------------------------------------------------------- the state
@dataclass(frozen=True)
class Spec:
    """One array of the benchmark state: its global shape and whether it is sharded by rows."""

    name: str
    rows: int
    sharded: bool
    seed: int

    @property
    def nbytes(self) -> int:
        return self.rows * COLS * 4


def state_specs(total_bytes: int) -> list[Spec]:
    """12 sharded + 4 replicated float32 matrices, about ``total_bytes`` of global bytes.

    Why this mix: sharded parameters dominate a real state, but replicated tensors (norms,
    small embeddings, optimizer scalars) test that each library writes a replica once.
    Sizes vary (1x to 2x) so that objects are not all alike.
    """
    sharded_bytes = total_bytes * 15 // 16
    weights = [1.0 + i / (SHARDED_ARRAYS - 1) for i in range(SHARDED_ARRAYS)]
    specs = []
    for i, w in enumerate(weights):
        rows = int(sharded_bytes * w / sum(weights) / (COLS * 4)) // ROW_ALIGN * ROW_ALIGN
        specs.append(Spec(f"sharded{i:02d}", max(ROW_ALIGN, rows), True, i))
    rep_rows = max(1, (total_bytes - sharded_bytes) // REPLICATED_ARRAYS // (COLS * 4))
    specs += [Spec(f"replicated{i}", rep_rows, False, 100 + i) for i in range(REPLICATED_ARRAYS)]
    return specs


def local_block(spec: Spec, rank: int, world: int) -> tuple[int, int]:
    """``(first_row, rows)`` this rank holds (all rows for a replicated array)."""
    if not spec.sharded:
        return 0, spec.rows
    rows = spec.rows // world
    return rank * rows, rows


def make_local(spec: Spec, rank: int, world: int, seed: int) -> np.ndarray:
    """This rank's values of ``spec``: seeded by (array, first row), so replicas agree across ranks."""
    first, rows = local_block(spec, rank, world)
    rng = np.random.default_rng([seed, spec.seed, first])
    out = np.empty((rows, COLS), dtype=np.float32)
    rng.random(out=out, dtype=np.float32)
    return out


# --------------------------------------------------------------------------- request counting
class RequestCounter:
    """Counts S3 API calls per operation name (``PutObject``, ``UploadPart``, ...) in this process.

    Why a ``before-call`` hook: it sees every call a boto3 or aiobotocore client makes, costs
    a counter increment, and needs no change to either library. cloudckpt retries in its own
    layer (botocore makes one attempt per call), so one call is one HTTP request there;
    s3fs lets aiobotocore retry, so its counts are a lower bound if the server failed any.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._hooked: set[int] = set()

    def hook(self, client: Any) -> None:
        if id(client) in self._hooked:
            return
        client.meta.events.register("before-call.s3", self._on_call)
        self._hooked.add(id(client))

    def _on_call(self, model: Any = None, **_: Any) -> None:
        with self._lock:
            self.counts[getattr(model, "name", "?")] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


# --------------------------------------------------------------------------- the spawned ranks
class RankState:
    """One spawned rank's side of a multi-process benchmark: its gloo group, mesh and state.

    ``originals`` (what is saved) and ``dests`` (zeroed restore targets) are numpy arrays of
    this rank's shards; ``ours_state`` / ``dcp_state`` view the same memory as cloudckpt
    ``ShardedArray``s or as ``DTensor``s (``Shard(0)``) and plain tensors. Shared by
    ``bench distributed`` and ``bench dcp``.
    """

    def __init__(self, rank: int, world: int, port: int, size_bytes: int) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from cloudckpt import Mesh
        from cloudckpt.coordination import TorchCoordinator, set_default_coordinator

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=GROUP_TIMEOUT))
        self.rank, self.world = rank, world
        self.coordinator = TorchCoordinator(timeout=GROUP_TIMEOUT)
        set_default_coordinator(self.coordinator)
        self.device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("x",))
        self.mesh = Mesh.from_device_mesh(self.device_mesh, coordinator=self.coordinator)
        self.specs = state_specs(size_bytes)
        self.originals = {s.name: make_local(s, rank, world, seed=0) for s in self.specs}
        self.dests = {s.name: np.zeros_like(self.originals[s.name]) for s in self.specs}
        self.global_bytes = sum(s.nbytes for s in self.specs)

    def ours_state(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        from cloudckpt import UNSHARDED, Layout, ShardedArray

        layout = Layout(["x", UNSHARDED], self.mesh)
        return {s.name: ShardedArray((s.rows, COLS), np.float32, layout, [arrays[s.name]]) if s.sharded
                else arrays[s.name] for s in self.specs}

    def dcp_state(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """DTensors (sharded) and plain tensors (replicated) over the same memory as ``arrays``."""
        import torch
        from torch.distributed.tensor import DTensor, Shard

        out: dict[str, Any] = {}
        for s in self.specs:
            tensor = torch.from_numpy(arrays[s.name])
            out[s.name] = (DTensor.from_local(tensor, self.device_mesh, [Shard(0)], run_check=False,
                                              shape=torch.Size((s.rows, COLS)), stride=(COLS, 1))
                           if s.sharded else tensor)
        return out


def worker(rank: int, world: int, port: int, config: dict[str, Any], report: dict[str, Any]) -> None:
    """Spawned ``world`` times: run every path in one gloo group; each rank reports (the parent uses rank 0's)."""
    report.update(_worker(rank, world, port, config))


def _worker(rank: int, world: int, port: int, config: dict[str, Any]) -> dict[str, Any]:
    import boto3
    import s3fs
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from cloudckpt import UNSHARDED, CheckpointOptions, DTensorCheckpoint, Layout, ShardedArray
    from cloudckpt.format import decode_index, index_key
    from cloudckpt.storage import resolve, storage_for_directory

    ranks = RankState(rank, world, port, config["size_bytes"])
    mesh, originals, dests, global_bytes = ranks.mesh, ranks.originals, ranks.dests, ranks.global_bytes
    ours_state, dcp_state = ranks.ours_state, ranks.dcp_state
    endpoint: str = config["endpoint"]
    bucket: str = config["bucket"]
    root = f"s3://{bucket}/w{world}"
    client = boto3.client("s3", endpoint_url=endpoint)
    counter = RequestCounter()

    save_ours = ours_state(originals)
    save_dcp = dcp_state(originals)
    restore_ours = ours_state(dests)
    restore_dcp = dcp_state(dests)

    def dcp_writer(url: str, threads: int) -> Any:
        # sync_files=False: on a non-local stream DCP's "sync" falls back to os.sync() of the
        # whole machine, which says nothing about S3 (a PUT is durable once it returns).
        return FsspecWriter(url, sync_files=False, thread_count=threads, endpoint_url=endpoint)

    def hook_clients() -> None:
        """Count requests of this process's cloudckpt client and of the s3fs instance DCP uses."""
        counter.hook(cast(Any, storage_for_directory(root)).client)  # S3Storage: the process-wide boto3 client
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)  # fsspec's instance cache: the one DCP got
        fs.connect()
        counter.hook(fs.s3)

    # Untimed warm-up: clients, s3fs session, cloudckpt's per-bucket conditional-write probe.
    tiny: dict[str, Any] = {"w": ShardedArray((ROW_ALIGN, 4), np.float32, Layout(["x", UNSHARDED], mesh))}
    DTensorCheckpoint(mesh, **tiny).write(f"{root}/warm/ours")
    dcp.save({"w": torch.zeros(4)}, storage_writer=dcp_writer(f"{root}/warm/dcp", 1))
    hook_clients()
    dist.barrier()

    def timed(fn: Callable[[], Any]) -> tuple[float, Counter[str]]:
        """Slowest rank's wall time of ``fn`` (barriers around it) and the requests of all ranks."""
        before = counter.snapshot()
        dist.barrier()
        started = time.perf_counter()
        fn()
        dist.barrier()
        elapsed = time.perf_counter() - started
        mine = counter.snapshot()
        mine.subtract(before)
        times: list[Any] = [None] * world
        counts: list[Any] = [None] * world
        dist.all_gather_object(times, elapsed)
        dist.all_gather_object(counts, dict(+mine))
        total: Counter[str] = Counter()
        for c in counts:
            total.update(c)
        return max(times), total

    def verify() -> bool:
        """Every local value restored (all ranks): a path that restores nothing fails here."""
        ok = all(np.array_equal(dests[n], originals[n]) for n in originals)
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, ok)
        return all(flags)

    def zero_dests() -> None:
        for array in dests.values():
            array.fill(0)

    def listing(prefix: str) -> tuple[int, int]:
        """Objects and bytes under ``prefix`` (rank 0 looks; untimed)."""
        count = size = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                count += 1
                size += obj["Size"]
        return count, size

    def delete_prefix(prefix: str) -> None:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

    io_options = CheckpointOptions(experimental_io_device="/job:worker/replica:0/task:0")
    save_paths: list[tuple[str, str, Callable[[str], Any]]] = [
        ("cloudckpt DTensorCheckpoint.write (per-host writes)", "ours",
         lambda url: DTensorCheckpoint(mesh, **save_ours).write(url)),
    ]
    if world > 1:
        save_paths.append(("cloudckpt, io_device = rank 0", "ours-io",
                           lambda url: DTensorCheckpoint(mesh, **save_ours).write(url, options=io_options)))
    thread_counts = sorted({1, config["dcp_threads"]})
    for threads in thread_counts:
        save_paths.append((f"torch DCP save, FsspecWriter ({threads} thread{'s' if threads > 1 else ''})",
                           f"dcp{threads}",
                           lambda url, t=threads: dcp.save(save_dcp, storage_writer=dcp_writer(url, t))))

    def ours_read(url: str) -> None:
        DTensorCheckpoint(mesh, **restore_ours).read(url).expect_partial()

    def dcp_read(url: str) -> None:
        dcp.load(restore_dcp, storage_reader=FsspecReader(url, endpoint_url=endpoint))

    restore_paths: list[tuple[str, str, Callable[[str], None]]] = [
        ("cloudckpt DTensorCheckpoint.read", "ours", ours_read)]
    restore_paths += [(f"torch DCP load, FsspecReader (of the {t}-thread save)", f"dcp{t}", dcp_read)
                      for t in thread_counts]

    results: dict[str, dict[str, Any]] = {}

    def record(direction: str, label: str, tag: str, seconds: float, requests: Counter[str],
               objects: tuple[int, int] | None = None, extra: dict[str, Any] | None = None) -> None:
        key = f"{direction}|{tag}"
        row = results.setdefault(key, {"direction": direction, "path": label, "tag": tag, "seconds": []})
        row["seconds"].append(seconds)
        row["requests"] = dict(requests)  # the last run's (the same every run)
        if objects is not None:
            row["objects"], row["stored_bytes"] = objects
        if extra:
            row.update(extra)

    for r in range(config["repeat"]):
        run_prefix = f"w{world}/r{r}"  # the same on every rank (the bucket is new per benchmark run)
        urls = {}
        for label, tag, save in save_paths:
            url = f"s3://{bucket}/{run_prefix}/{tag}/ckpt" if tag.startswith("ours") else \
                f"s3://{bucket}/{run_prefix}/{tag}"
            urls[tag] = url
            seconds, requests = timed(lambda save=save, url=url: save(url))
            extra: dict[str, Any] = {}
            objects = None
            if rank == 0:
                objects = listing(f"{run_prefix}/{tag}/")
                if tag.startswith("ours"):
                    location = resolve(url)
                    storage, name = location.storage, location.name
                    index = decode_index(storage.get(index_key(name)), name, url)
                    extra["index_data_objects"] = len(index.objects)
            record("save", label, tag, seconds, requests, objects, extra)
        for label, tag, read in restore_paths:
            zero_dests()
            seconds, requests = timed(lambda read=read, url=urls[tag]: read(url))
            if not verify():
                raise AssertionError(f"{label}: restored values differ from the saved ones (world {world})")
            record("restore", label, tag, seconds, requests)
        dist.barrier()
        if rank == 0:
            delete_prefix(f"{run_prefix}/")
        dist.barrier()
        if rank == 0:
            print(f"  world {world}: run {r + 1}/{config['repeat']} done", flush=True)

    dist.barrier()
    dist.destroy_process_group()
    return {"world": world, "global_bytes": global_bytes, "results": list(results.values())}


# --------------------------------------------------------------------------- the parent
def spawn(world: int, config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``worker`` in ``world`` spawned processes (bounded wait, killed by PID after it); rank 0's report."""
    return spawn_reports(worker, world, config, timeout=timeout)[0]


def _requests(row: dict[str, Any]) -> str:
    counts = row.get("requests", {})
    total = sum(counts.values())
    if not total:
        return "n/a"
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{total} ({parts})"


def report(worlds: list[dict[str, Any]]) -> tuple[str, str, str]:
    """The throughput table, the ratio table, and the objects/requests table (markdown)."""
    lines = ["| processes | direction | path | best s | aggregate MiB/s | cloudckpt / best DCP |",
             "|---:|---|---|---:|---:|---:|"]
    ratio_lines = ["| processes | save: cloudckpt / best DCP | restore: cloudckpt / best DCP | "
                   "save: io_device / per-host |", "|---:|---:|---:|---:|"]
    count_lines = ["| processes | checkpoint | objects | requests (all ranks) |", "|---:|---|---:|---|"]
    for w in worlds:
        size = w["global_bytes"]
        rows = w["results"]
        for row in rows:
            row["best"] = min(row["seconds"])
            row["mib_s"] = size / MiB / row["best"]
        ratios: dict[str, str] = {}
        for direction in ("save", "restore"):
            group = [r for r in rows if r["direction"] == direction]
            best_dcp = max((r["mib_s"] for r in group if r["tag"].startswith("dcp")), default=float("nan"))
            for r in group:
                ratio = f"**{r['mib_s'] / best_dcp:.2f}x**" if r["tag"].startswith("ours") else ""
                if r["tag"] == "ours":
                    ratios[direction] = f"{r['mib_s'] / best_dcp:.2f}x"
                lines.append(f"| {w['world']} | {direction} | {r['path']} | {r['best']:.2f} | {r['mib_s']:.0f} "
                             f"| {ratio} |")
        by_tag = {(r["direction"], r["tag"]): r for r in rows}
        io = by_tag.get(("save", "ours-io"))
        io_ratio = f"{io['mib_s'] / by_tag[('save', 'ours')]['mib_s']:.2f}x" if io else "-"
        ratio_lines.append(f"| {w['world']} | {ratios.get('save', '-')} | {ratios.get('restore', '-')} | {io_ratio} |")
        for r in rows:
            if r["direction"] == "save":
                objects = f"{r.get('objects', '?')}"
                if "index_data_objects" in r:
                    objects += f" ({r['index_data_objects']} data + 1 index)"
                count_lines.append(f"| {w['world']} | save: {r['path']} | {objects} | {_requests(r)} |")
        for r in rows:
            if r["direction"] == "restore":
                count_lines.append(f"| {w['world']} | restore: {r['path']} | | {_requests(r)} |")
    return "\n".join(lines), "\n".join(ratio_lines), "\n".join(count_lines)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the spawned ranks (they inherit ``os.environ``), then restore them."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def seaweedfs_bucket(name: str) -> Iterator[tuple[str, str]]:
    """``(endpoint, bucket)``: one SeaweedFS on 127.0.0.1 (stopped by its PID) with a fresh bucket.

    ``AWS_ENDPOINT_URL`` points at it meanwhile, so the spawned ranks inherit it; dummy
    credentials are set unless real ones are. Shared by ``bench distributed`` and ``bench dcp``.
    """
    sys.path.insert(0, str(REPO / "tests"))
    import boto3
    import servers  # the launcher the tests use: 127.0.0.1, free ports, stopped by PID

    use_bench_credentials()
    with tempfile.TemporaryDirectory(prefix=f"cloudckpt-bench-{name}-", dir=REPO) as tmp, \
            servers.seaweedfs(Path(tmp) / "weed") as server:
        print(f"SeaweedFS at {server.endpoint}", flush=True)
        bucket = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
        with _environ(AWS_ENDPOINT_URL=server.endpoint):
            yield server.endpoint, bucket


def world_parser(prog: str, description: str | None, *, size_mib: int, timeout: float) -> argparse.ArgumentParser:
    """The options every multi-process benchmark takes (size, smoke run, repeats, worlds, timeout)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=size_mib, help=f"global state size (default {size_mib})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB (overrides --size-mib)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per path; the best counts (default 2)")
    parser.add_argument("--worlds", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--timeout", type=float, default=timeout, help="bound on each world's spawn, seconds")
    return parser


def parse_worlds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    worlds = [int(w) for w in text.split(",") if w]
    if any(w < 1 or w > ROW_ALIGN for w in worlds):
        parser.error(f"--worlds must be between 1 and {ROW_ALIGN}")
    return worlds


def main(argv: list[str]) -> int:
    parser = world_parser("python -m bench distributed", __doc__, size_mib=512, timeout=1800.0)
    parser.add_argument("--dcp-threads", type=int, default=4,
                        help="also run DCP's writer with this many threads (cloudckpt uses 4); 1 = default only")
    args = parser.parse_args(argv)
    size_mib = 64 if args.quick else args.size_mib
    worlds = parse_worlds(parser, args.worlds)

    import s3fs
    import torch

    print(describe_run(), flush=True)
    results = []
    with seaweedfs_bucket("dist") as (endpoint, bucket):
        config = {"endpoint": endpoint, "bucket": bucket, "size_bytes": size_mib * MiB,
                  "repeat": args.repeat, "dcp_threads": args.dcp_threads}
        for world in worlds:
            print(f"world {world}: spawning {world} gloo process(es) ...", flush=True)
            started = time.monotonic()
            results.append(spawn(world, config, args.timeout))
            print(f"world {world}: done in {time.monotonic() - started:.0f} s", flush=True)
    throughput, ratios, counts = report(results)
    specs = state_specs(size_mib * MiB)
    print()
    print(f"{sum(s.nbytes for s in specs) / MiB:.0f} MiB float32 ({SHARDED_ARRAYS} sharded + {REPLICATED_ARRAYS} "
          f"replicated arrays), best of {args.repeat}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"s3fs {s3fs.__version__}, SeaweedFS on 127.0.0.1")
    print(throughput)
    print()
    print(ratios)
    print()
    print(counts)
    print(f"{describe_run()} (at the end)")
    return 0
