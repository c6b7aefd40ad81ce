"""Scaling benchmark (issue 16): many simulated hosts writing small shards through an S3 throttle.

No one can run 1,000 hosts here, so this simulates them: for each host count (default 16,
64, 256) and each library, one process (``bench/scale_worker.py``) runs that many hosts as
threads - each with its own ``Mesh``, its own shards, its own boto3 client and storage
instance, on the real multi-host save and restore code (``cloudckpt.testing.threads``) -
against SeaweedFS behind ``bench/throttle_proxy.py``, which enforces S3-like request limits
per key-prefix partition (default 50 writes and 80 reads per second per partition: S3's
3,500 / 5,500 scaled down to what this machine serves) and answers ``503 SlowDown`` above them.

Libraries (``--libraries``):

* ``old``: cloudckpt before the throttling change (``--old-root``, default /work/wt-old, made
  with ``git worktree add /work/wt-old 105636b``): the same worker, run with that checkout
  first on ``PYTHONPATH`` - fixed 6 tries per request, whatever the answer;
* ``current``: this checkout (AIMD concurrency per storage object, throttled answers retried
  until a deadline of minutes, with full jitter);
* ``dcp``: ``torch.distributed.checkpoint`` ``FsspecWriter`` / ``FsspecReader`` over s3fs,
  its ranks as threads of torch's own threaded process group (what torch's tests use to run
  many ranks in one process), one ``S3FileSystem`` per rank.

Per configuration and phase (save, restore, restore through the io host): seconds (slowest
host, between barriers), whether every host succeeded, requests and 503s at the throttle,
client-side retries, the busiest partition's mean and peak accepted requests per second,
index GETs, bytes written. Partitions: the checkpoint directory plus ``--partition-chars``
characters (default 2: today every object of a checkpoint directory - ``ckpt-1.index``,
``ckpt-1.data-…``, DCP's ``__3_0.distcp`` and ``.metadata`` - shares its first two characters,
so a directory is one partition, as a fresh S3 prefix is; a layout with a 2-hex-character
sub-prefix right after the directory spreads over 256, and one under ``ckpt-1.d/`` needs
``--partition-chars 11``).

Index rows (``--index-hosts`` x ``--index-arrays``, default 4,096 x 1,000 = 4M chunks; local
disk, each phase alone in a process with a memory cap, so its peak memory is its own): write
(``DTensorCheckpoint.write`` of one process holding all devices), read (fetch + parse +
validate), ``list_variables``; a one-array ``--index-hosts``-shard checkpoint's restore
time against its write time; and the save plan every host computes from all hosts'
descriptions (``--plan-arrays`` pieces each), with the bytes of descriptions each host receives.

Prints the load average before and after, the command, and each library's revision. On a
busy machine the absolute seconds are noise; counts (503s, retries, failed saves, index
GETs) and the ratios between libraries in one run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.bench_checkpoint import describe_run, revision, use_bench_credentials

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "bench" / "scale_worker.py"
MiB = 1024 * 1024
GiB = 1024 * MiB


def run_worker(config: dict[str, Any], library_root: Path, timeout: float) -> dict[str, Any]:
    """One scenario in its own process, ``library_root`` first on its path; killed by PID at ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-scale-") as tmp:
        config_file, report_file = Path(tmp, "config.json"), Path(tmp, "report.json")
        config_file.write_text(json.dumps(config))
        env = dict(os.environ, PYTHONPATH=str(library_root))
        # cwd outside both checkouts: nothing but PYTHONPATH decides which cloudckpt is imported.
        proc = subprocess.Popen([sys.executable, str(WORKER), str(config_file), str(report_file)], env=env, cwd=tmp)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            return {"crash": f"killed after {timeout:.0f} s", "phases": []}
        if not report_file.exists():
            return {"crash": f"worker exited {proc.returncode} without a report", "phases": []}
        report: dict[str, Any] = json.loads(report_file.read_text())
        return report


@contextmanager
def s3_behind_throttle(args: argparse.Namespace) -> Iterator[tuple[Any, str, Any, str]]:
    """SeaweedFS (tests/servers.py) and the throttle in front of it: (proxy, bucket, rule class, server endpoint)."""
    sys.path.insert(0, str(REPO / "tests"))
    import boto3
    import servers

    from bench.throttle_proxy import PartitionRule, ThrottleProxy

    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-scale-", dir=REPO) as tmp, \
            servers.seaweedfs(Path(tmp) / "weed") as server:
        bucket = f"bench-scale-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
        with ThrottleProxy(server.endpoint, write_rate=args.write_rate, read_rate=args.read_rate,
                           burst=args.burst) as proxy:
            yield proxy, bucket, PartitionRule, server.endpoint


def floor_seconds(accepted: int, rate: float, burst: float) -> float:
    """The least time the throttle allows for ``accepted`` requests in one partition."""
    return max(0.0, accepted - max(1.0, rate * burst)) / rate


def scenario_rows(label: str, hosts: int, report: dict[str, Any], proxy: Any) -> list[dict[str, Any]]:
    rows = []
    if report.get("crash"):
        rows.append({"library": label, "hosts": hosts, "phase": "-", "note": report["crash"][:300]})
    for phase in report.get("phases", []):
        summary = proxy.summary(phase["start"], phase["end"]) if phase.get("start") else None
        row: dict[str, Any] = {"library": label, "hosts": hosts, **phase}
        if summary is not None:
            klass = "read" if phase["phase"].startswith("restore") else "write"
            partition, mean, peak = summary.busiest(klass)
            counts = summary.partitions.get(partition)
            accepted = counts.requests[klass] - counts.throttled[klass] if counts else 0
            rate = proxy.throttle.rates[klass]
            row["floor"] = floor_seconds(accepted, rate, proxy.throttle.burst)
            row.update(requests=summary.requests, slowdowns=summary.throttled, partitions=len(summary.partitions),
                       busiest=partition, busiest_mean=mean, busiest_peak=peak, index_gets=summary.index_gets,
                       index_gets_throttled=summary.index_gets_throttled, bytes_written=summary.bytes_written)
        rows.append(row)
    return rows


def retries_of(row: dict[str, Any]) -> str:
    if row["library"] == "dcp":
        return "n/a"
    logged = row.get("retries_logged_throttled", 0) + row.get("retries_logged_transient", 0)
    client = row.get("client")
    extra = f" (min conc. {client['min_concurrency']})" if client else ""
    return f"{logged}{extra}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| library | hosts | phase | s | throttle floor s | hosts ok | committed | requests | 503s | retries | "
             "partitions | busiest partition: req/s mean / peak | index GETs (503) | MiB written |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['library']} | {r['hosts']} | - | | | | | | | | | | | | {r['note']} |")
            continue
        seconds = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        committed = {True: "yes", False: "**no**"}.get(r.get("committed"), "")
        ok = r["ranks"] - r["failed_ranks"]
        ok_text = f"{ok}/{r['ranks']}" if ok == r["ranks"] else f"**{ok}/{r['ranks']}**"
        lines.append(
            f"| {r['library']} | {r['hosts']} | {r['phase']} | {seconds} | {r.get('floor', 0):.1f} | {ok_text} | "
            f"{committed} | "
            f"{r.get('requests', '')} | {r.get('slowdowns', '')} | {retries_of(r)} | {r.get('partitions', '')} | "
            f"{r.get('busiest_mean', 0):.0f} / {r.get('busiest_peak', 0)} | "
            f"{r.get('index_gets', '')} ({r.get('index_gets_throttled', '')}) | "
            f"{r.get('bytes_written', 0) / MiB:.1f} |")
    return "\n".join(lines)


def errors_of(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['library']} {r['hosts']} {r['phase']}: {e}" for r in rows for e in r.get("errors", [])]


def run_index_rows(args: argparse.Namespace) -> str:
    lines = ["| case | phase | s | peak RSS MiB | detail |", "|---|---|---:|---:|---|"]
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-scale-index-", dir=REPO) as tmp:
        cases = [("big", args.index_hosts, args.index_arrays, ("write", "read", "list")),
                 ("one", args.index_hosts, 1, ("write", "restore"))]
        cases += [("plan", args.index_hosts, arrays, ("plan",)) for arrays in args.plan_arrays]
        for name, hosts, arrays, phases in cases:
            label = f"{hosts} hosts x {arrays} array{'s' if arrays > 1 else ''}"
            for phase in phases:
                print(f"index: {label}: {phase} ...", flush=True)
                config = {"mode": "index", "phase": phase, "hosts": hosts, "arrays": arrays, "directory": tmp,
                          "name": name, "memory_limit": args.index_memory_gib * GiB}
                report = run_worker(config, REPO, args.timeout)
                if report.get("crash"):
                    lines.append(f"| {label} | {phase} | - | - | failed: {report['crash'][:200]} |")
                    break
                detail = ", ".join(f"{k} {report[k]}" for k in ("index_bytes", "chunks", "variables",
                                                                  "gathered_mib_per_host", "error") if k in report)
                lines.append(f"| {label} | {phase} | {report['seconds']:.2f} | {report['peak_rss_mib']:.0f} | "
                             f"{detail} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="16,64,256", help="comma-separated simulated host counts")
    parser.add_argument("--libraries", default="old,current,dcp", help="any of old,current,dcp")
    parser.add_argument("--old-root", default="/work/wt-old", help="checkout of the library before the "
                        "throttling change (git worktree add /work/wt-old 105636b)")
    parser.add_argument("--arrays", type=int, default=4, help="sharded arrays per host (default 4)")
    parser.add_argument("--shard-kib", type=int, default=64, help="bytes of each array per host, KiB (default 64)")
    parser.add_argument("--write-rate", type=float, default=50.0, help="writes/s per partition (default 50)")
    parser.add_argument("--read-rate", type=float, default=80.0, help="reads/s per partition (default 80)")
    parser.add_argument("--burst", type=float, default=1.0, help="seconds of rate a partition saves up")
    parser.add_argument("--partition-chars", type=int, default=2,
                        help="characters after the checkpoint directory that name a partition (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on each scenario, seconds")
    parser.add_argument("--group-timeout", type=float, default=300.0, help="simulated hosts' collective timeout")
    parser.add_argument("--index-hosts", type=int, default=4096)
    parser.add_argument("--index-arrays", type=int, default=1000)
    parser.add_argument("--plan-arrays", type=lambda text: [int(a) for a in text.split(",") if a],
                        default=[4, 40], help="arrays per host of the save-plan rows (default 4,40)")
    parser.add_argument("--index-memory-gib", type=float, default=8.0, help="memory cap of each index phase")
    parser.add_argument("--skip-index", action="store_true", help="only the throttled save/restore rows")
    parser.add_argument("--skip-s3", action="store_true", help="only the index rows")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 hosts, and an index of 4,096 x 10 arrays")
    args = parser.parse_args(argv)
    if args.quick:
        args.hosts, args.index_arrays, args.plan_arrays = "16", 10, [4]
    hosts_list = [int(h) for h in args.hosts.split(",") if h]
    libraries = [lib for lib in args.libraries.split(",") if lib]
    unknown = set(libraries) - {"old", "current", "dcp"}
    if unknown:
        parser.error(f"unknown libraries {sorted(unknown)}")
    old_root = Path(args.old_root)
    if "old" in libraries and not (old_root / "cloudckpt").is_dir():
        print(f"skipping 'old': {old_root} has no cloudckpt/ (make it with git worktree add {old_root} 105636b)")
        libraries.remove("old")

    print(f"command: python -m bench scale {' '.join(argv)}")
    print(f"at start ({os.cpu_count()} cores): {describe_run()}")
    if "old" in libraries:
        print(f"old library: {old_root} @ {revision(old_root)}")
    use_bench_credentials()
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    if not args.skip_s3:
        with s3_behind_throttle(args) as (proxy, bucket, rule_class, direct):
            print(f"throttle at {proxy.endpoint}: {args.write_rate:g} writes/s and {args.read_rate:g} reads/s per "
                  f"partition, burst {args.burst:g} s, partition = directory + {args.partition_chars} chars",
                  flush=True)
            for hosts in hosts_list:
                for library in libraries:
                    prefix = f"{library}-{hosts}-{uuid.uuid4().hex[:6]}"
                    directory = f"{prefix}/dcp/" if library == "dcp" else f"{prefix}/"
                    proxy.throttle.set_rule(rule_class(directories=(directory,), chars=args.partition_chars))
                    config = {"mode": "dcp" if library == "dcp" else "cloudckpt", "hosts": hosts,
                              "arrays": args.arrays, "shard_bytes": args.shard_kib * 1024,
                              "endpoint": proxy.endpoint, "direct_endpoint": direct, "bucket": bucket,
                              "prefix": prefix,
                              "group_timeout": args.group_timeout, "phase_timeout": args.timeout / 2}
                    print(f"{library}, {hosts} hosts ...", flush=True)
                    t0 = time.monotonic()
                    report = run_worker(config, old_root if library == "old" else REPO, args.timeout)
                    new = scenario_rows(library, hosts, report, proxy)
                    rows.extend(new)
                    print(f"  done in {time.monotonic() - t0:.0f} s (worker used {report.get('library', '?')})",
                          flush=True)
        per_host = args.arrays * args.shard_kib
        print()
        print(f"{args.arrays} float32 arrays sharded by rows, {per_host} KiB per host "
              f"({per_host / 1024:.2f} MiB per host, one data object per host)")
        print(table(rows))
        for line in errors_of(rows):
            print(f"  error: {line}")
    if not args.skip_index:
        print()
        print(run_index_rows(args))
    print()
    print(f"at end: {describe_run()}; wall {time.monotonic() - started:.0f} s")
    return 0
