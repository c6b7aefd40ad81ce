"""Client CPU per byte: CPU-seconds per GiB of save and restore, next to throughput (issue 27).

On a 2-core box the S3 server shares the CPUs with the client, so throughput alone hides what
limits a real training host uploading at 100 Gbps: how much client CPU each GiB costs. This
suite times the same paths as ``bench checkpoint`` (``bench/ckpt_paths.py``: cloudckpt's
``Checkpoint.write`` / ``.read``, one boto3 PUT/GET, obstore's one PUT/GET and its multipart /
``get_ranges``, s3torchconnector, tensorstore) against one SeaweedFS on 127.0.0.1, once over
plain HTTP and once over HTTPS (the same server's TLS port, a self-signed certificate made at
start, given to every client as its CA bundle - as users run it). For each operation it takes
the wall time and the user + system CPU time of this process (``resource.getrusage``: every
thread, the Rust / C ones included) and reports the best run of each, with the server
process's CPU over the same span (its median per GiB): on this box the server saturates first.

``--profile`` then records where cloudckpt's own CPU goes (py-spy, every thread, in a child
process) per phase: save, restore. ``--first`` measures the first request of a process (a fresh
interpreter: client creation + a 4 MiB save, then another for the restore) for cloudckpt and
obstore. ``--gcs`` adds cloudckpt's GCS backend and google-cloud-storage's own upload and
download over fake-gcs-server. The load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_checkpoint import (
    describe_run,
    make_state,
    reclaim_deleted_space,
    state_bytes,
    use_bench_credentials,
    verify,
)
from bench.ckpt_paths import (
    PathSpec,
    SavePath,
    Setup,
    s3_client,
    s3_specs,
)
from bench.cpu_children import first_request, profile_ours

MiB = 1024 * 1024
GiB = 1024 * MiB
REPO = Path(__file__).resolve().parent.parent
#: Path keys of ``bench/ckpt_paths.s3_specs`` measured by default (the transports and checkpoint peers).
DEFAULT_PATHS = ("s3-ours", "s3-obstore", "s3-obstore-parts", "s3-boto3", "s3-s3tck", "s3-s3tdcp4", "s3-ts")
OBSTORE = ("s3-obstore", "s3-obstore-parts")


@dataclass
class Sample:
    wall: float
    cpu: float
    server_cpu: float = float("nan")  # the server process's CPU in the same span (NaN: not known)


@dataclass
class Row:
    protocol: str
    key: str
    name: str
    ours: bool
    save: list[Sample] = field(default_factory=list)
    restore: list[Sample] = field(default_factory=list)
    error: str = ""


def cpu_seconds() -> float:
    """User + system CPU of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of another process so far (Linux ``/proc/<pid>/stat``); NaN elsewhere.

    Why: on this box the server, not the client, is what saturates first (SeaweedFS spends
    ~8-10 CPU-s per GiB written, over half of it in MD5). Its CPU per GiB next to the client's
    says whether a client is faster because it costs the server less or because it takes less
    of the shared cores.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(fn: Callable[[], Any], server_cpu: Callable[[], float] | None = None) -> tuple[Sample, Any]:
    gc.collect()
    server0 = server_cpu() if server_cpu is not None else float("nan")
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    server = server_cpu() - server0 if server_cpu is not None else float("nan")
    return Sample(wall, cpu, server), out


@contextlib.contextmanager
def endpoint_env(endpoint: str, ca_bundle: Path | None) -> Iterator[None]:
    """Point every client at ``endpoint``: boto3 / cloudckpt / CRT read ``AWS_ENDPOINT_URL``; the CA
    bundle goes where each client looks (botocore ``AWS_CA_BUNDLE``, OpenSSL-based ``SSL_CERT_FILE``;
    obstore gets it in its options, tensorstore's ``TENSORSTORE_CA_BUNDLE`` is set once in ``main``)."""
    names = ("AWS_ENDPOINT_URL", "AWS_CA_BUNDLE", "SSL_CERT_FILE")
    saved = {n: os.environ.get(n) for n in names}
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    for name in names[1:]:
        if ca_bundle is not None:
            os.environ[name] = str(ca_bundle)
        else:
            os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure_protocol(protocol: str, specs: list[PathSpec], setup: Setup, repeat: int,
                     server_pid: int | None = None) -> list[Row]:
    """Save each path ``repeat`` times round-robin, then restore round-robin (each restore verified).

    With ``server_pid``, each sample also holds that process's CPU over the same span.
    """
    server_cpu = functools.partial(process_cpu_seconds, server_pid) if server_pid is not None else None
    rows: list[tuple[Row, SavePath | None]] = []
    for spec in specs:
        try:
            rows.append((Row(protocol, spec.key, "", False), spec.factory(setup)))
        except Exception as exc:  # a peer that cannot be built here (missing, no TLS support) is reported
            rows.append((Row(protocol, spec.key, spec.key, False, error=f"{type(exc).__name__}: {exc}"[:160]), None))
    for row, path in rows:
        if path is not None:
            row.name, row.ours = path.name, path.ours
    for row, path in rows:  # untimed warm-up: clients, connections, TLS sessions, probes
        if path is not None:
            try:
                path.save(repeat)
                path.clear(repeat)
            except Exception as exc:
                row.error = f"warm-up save: {type(exc).__name__}: {exc}"[:200]
                print(f"  {protocol} {row.key} FAILED {row.error}", flush=True)
    for phase in ("save", "restore"):
        for i in range(repeat):
            for row, path in rows:
                if path is None or row.error:
                    continue
                try:
                    if phase == "save":
                        if i > 0:
                            path.clear(i - 1)
                        sample, _ = measured(functools.partial(path.save, i), server_cpu)
                        row.save.append(sample)
                    else:
                        path.before_restore()
                        sample, restored = measured(functools.partial(path.restore, repeat - 1), server_cpu)
                        verify(restored, setup.state, f"{protocol} {row.name}")
                        del restored
                        row.restore.append(sample)
                except Exception as exc:
                    row.error = f"{phase}: {type(exc).__name__}: {exc}"[:200]
                    print(f"  {protocol} {row.key} FAILED {row.error}", flush=True)
                    continue
                print(f"  {protocol} {phase:7} {row.name}: {sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU, "
                      f"server {sample.server_cpu:.2f} s CPU", flush=True)
    for _row, path in rows:
        if path is not None:
            with contextlib.suppress(Exception):
                path.clear(repeat - 1)
    return [row for row, _ in rows]


def best(samples: list[Sample], size: int) -> tuple[float, float]:
    """(MiB/s of the fastest run, CPU-s/GiB of the cheapest run); NaN when none ran."""
    if not samples:
        return float("nan"), float("nan")
    return size / MiB / min(s.wall for s in samples), min(s.cpu for s in samples) / (size / GiB)


def median_rate(samples: list[Sample], size: int) -> float:
    """MiB/s of the median run (the lower middle of an even count): next to the best, the spread.

    Why both: the server shares the client's 2 cores, so one run of a path differs from the
    next by 5-10 %, as much as the paths differ; a best-of-N ratio near 1.0 can fall either way
    by luck, the median says which path is usually faster.
    """
    return size / MiB / _middle([s.wall for s in samples])


def median_server_cpu(samples: list[Sample], size: int) -> float:
    """The server's median CPU-s/GiB over ``samples`` (NaN when not measured)."""
    return _middle([s.server_cpu for s in samples if s.server_cpu == s.server_cpu]) / (size / GiB)


def _middle(values: list[float]) -> float:
    """The middle value (the upper one of an even count); NaN for none."""
    return sorted(values)[len(values) // 2] if values else float("nan")


def report(rows: list[Row], size: int) -> str:
    lines = ["| protocol | client | save MiB/s best (median) | save CPU-s/GiB | server CPU-s/GiB (median) "
             "| restore MiB/s best (median) | restore CPU-s/GiB | server CPU-s/GiB (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.error and not (row.save and row.restore):
            lines.append(f"| {row.protocol} | {row.name} | not measured: {row.error} | | | | | |")
            continue
        save_rate, save_cpu = best(row.save, size)
        restore_rate, restore_cpu = best(row.restore, size)
        name = f"**{row.name}**" if row.ours else row.name
        lines.append(f"| {row.protocol} | {name} | {save_rate:.0f} ({median_rate(row.save, size):.0f}) | "
                     f"{save_cpu:.2f} | {median_server_cpu(row.save, size):.2f} | "
                     f"{restore_rate:.0f} ({median_rate(row.restore, size):.0f}) | "
                     f"{restore_cpu:.2f} | {median_server_cpu(row.restore, size):.2f} |")
    lines.append("")
    for protocol in dict.fromkeys(r.protocol for r in rows):
        group = [r for r in rows if r.protocol == protocol and r.save]
        ours = next((r for r in group if r.ours), None)
        obstore = [r for r in group if r.key in OBSTORE]
        peers = [r for r in group if not r.ours]
        if ours is None or not obstore or not peers:
            continue
        o_save, o_restore = best(ours.save, size)[1], best(ours.restore, size)[1]
        ob_save = min(best(r.save, size)[1] for r in obstore)
        ob_restore = min(best(r.restore, size)[1] for r in obstore)
        w_save, w_restore = best(ours.save, size)[0], best(ours.restore, size)[0]
        p_save = max(best(r.save, size)[0] for r in peers)
        p_restore = max(best(r.restore, size)[0] for r in peers)
        m_save = median_rate(ours.save, size) / max(median_rate(r.save, size) for r in peers)
        m_restore = median_rate(ours.restore, size) / max(median_rate(r.restore, size) for r in peers)
        lines.append(f"- {protocol}: save CPU {o_save / ob_save:.2f}x obstore's best (target <= 1.2x), restore "
                     f"CPU {o_restore / ob_restore:.2f}x (target <= 1.0x); throughput save {w_save / p_save:.2f}x, "
                     f"restore {w_restore / p_restore:.2f}x the best peer (target >= 1.0x); medians: save "
                     f"{m_save:.2f}x, restore {m_restore:.2f}x the best peer's median")
    return "\n".join(lines)


# --------------------------------------------------------------------------- GCS (fake-gcs-server)
def gcs_paths(s: Setup) -> list[PathSpec]:
    """cloudckpt's GCS backend and google-cloud-storage's own one-object upload / download."""
    import google.cloud.storage as gcs
    from google.auth.credentials import AnonymousCredentials

    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    client = gcs.Client(project="bench", credentials=anonymous, client_options={"api_endpoint": s.endpoint})
    bucket = client.create_bucket(s.bucket)

    def clear(prefix: str) -> Callable[[int], None]:
        def clear_run(i: int) -> None:
            for blob in client.list_blobs(s.bucket, prefix=f"{prefix}-{i}/"):
                blob.delete()
        return clear_run

    def ours(_: Setup) -> SavePath:
        import cloudckpt

        writer, reader = cloudckpt.Checkpoint(state=s.state), cloudckpt.Checkpoint(state=s.dest)

        def restore(i: int) -> Any:
            reader.read(f"gs://{s.bucket}/ours-{i}/ckpt").assert_consumed()
            return s.dest
        def save(i: int) -> None:
            writer.write(f"gs://{s.bucket}/ours-{i}/ckpt")
        return SavePath("gcs", "cloudckpt Checkpoint.write / read", True, "PUT", "in place", save, restore,
                        clear("ours"), s.zero_dest)

    def sdk(_: Setup) -> SavePath:
        blob = s.blob()

        def save(i: int) -> None:  # the SDK's default: a resumable upload in 100 MiB chunks above 8 MiB
            bucket.blob(f"sdk-{i}/state.bin").upload_from_string(blob, content_type="application/octet-stream")

        def restore(i: int) -> Any:
            return s.views(bucket.blob(f"sdk-{i}/state.bin").download_as_bytes())
        return SavePath("gcs", "google-cloud-storage upload_from_string / download_as_bytes (bytes only)", False,
                        "PUT", "full load", save, restore, clear("sdk"))
    return [PathSpec("gcs-ours", "gcs", ours), PathSpec("gcs-sdk", "gcs", sdk)]


# --------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="state size (default 1024 = 1 GiB)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per path; the best counts (default 2)")
    parser.add_argument("--protocols", default="http,https", help="comma-separated: http, https")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"path keys of bench checkpoint --list-paths (default {','.join(DEFAULT_PATHS)})")
    parser.add_argument("--profile", action="store_true", help="also profile cloudckpt's save/restore (py-spy)")
    parser.add_argument("--profile-dir", default=tempfile.gettempdir(), help="where --profile writes its stacks")
    parser.add_argument("--first", action="store_true", help="also time the first request of a process")
    parser.add_argument("--gcs", action="store_true", help="also measure GCS over fake-gcs-server")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed table (with --profile/--first)")
    args = parser.parse_args(argv)
    protocols = [p for p in args.protocols.split(",") if p]
    wanted = [k for k in args.paths.split(",") if k]
    known = {spec.key: spec for spec in s3_specs(4)}
    if set(wanted) - set(known) or set(protocols) - {"http", "https"}:
        parser.error(f"unknown paths or protocols; paths: {sorted(known)}")

    use_bench_credentials()
    started_as = describe_run()
    print(started_as, flush=True)
    state = make_state(args.size_mib * MiB)
    size = state_bytes(state)
    dest = {k: np.zeros_like(v) for k, v in state.items()}
    print(f"  {len(state)} float32 arrays, {size / MiB:.1f} MiB", flush=True)
    sys.path.insert(0, str(REPO / "tests"))
    import servers

    rows: list[Row] = []
    firsts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-cpu-", dir=REPO) as tmp, \
            servers.seaweedfs(Path(tmp) / "weed", tls=True) as server:
        endpoints = {"http": (server.endpoint, None), "https": (server.https_endpoint or "", server.ca_bundle)}
        if server.ca_bundle is not None:  # tensorstore reads it once, at its first request: set it before the first
            os.environ["TENSORSTORE_CA_BUNDLE"] = str(server.ca_bundle)
        for protocol in protocols:
            endpoint, ca_bundle = endpoints[protocol]
            # A bucket per protocol: cloudckpt keeps the storage (and its client) of a directory it
            # opened, so the same URLs over the other protocol would silently reuse the first client.
            bucket = f"cpu-{protocol}-{uuid.uuid4().hex[:10]}"
            s3_client(server.endpoint).create_bucket(Bucket=bucket)
            with endpoint_env(endpoint, ca_bundle):
                print(f"{protocol}: {endpoint} ...", flush=True)
                if not args.no_timing:
                    setup = Setup(state, dest, Path(tmp), endpoint, bucket,
                                  reclaim=functools.partial(reclaim_deleted_space, server))
                    rows += measure_protocol(protocol, [known[k] for k in wanted], setup, args.repeat,
                                             server.process.pid)
                if args.profile:
                    profile_ours(protocol, bucket, args.size_mib, Path(args.profile_dir))
                if args.first:
                    for key in ("ours", "obstore"):
                        save_s, restore_s = first_request(key, bucket, endpoint)
                        firsts.append(f"| {protocol} | {key} | {save_s:.3f} | {restore_s:.3f} |")
                        print(f"  first request {protocol} {key}: save {save_s:.3f} s, restore {restore_s:.3f} s",
                              flush=True)
        if args.gcs:
            with servers.fake_gcs(Path(tmp) / "gcs") as gcs_server:
                os.environ["STORAGE_EMULATOR_HOST"] = gcs_server.endpoint
                print(f"gcs: fake-gcs-server at {gcs_server.endpoint} ...", flush=True)
                setup = Setup(state, dest, Path(tmp), gcs_server.endpoint, f"cpu-{uuid.uuid4().hex[:10]}")
                rows += measure_protocol("gcs http", gcs_paths(setup), setup, args.repeat,
                                         gcs_server.process.pid)
    print()
    print(f"{size / MiB:.0f} MiB, best of {args.repeat}, {os.cpu_count()} cores")
    print(f"start: {started_as}")
    print(f"end:   {describe_run()}")
    if rows:
        print(report(rows, size))
    if firsts:
        print("\n| protocol | client | first save s | first restore s |\n|---|---|---:|---:|")
        print("\n".join(firsts))
    return 0
