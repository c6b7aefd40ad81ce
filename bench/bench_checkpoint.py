"""Checkpoint benchmark: cloudckpt's save/restore against what users would otherwise write.

One run measures four things on the same state (a seeded, model + Adam-like mix of a few
hundred float32 arrays, ``--size-mib`` in total, a few large and many small):

1. **Save and restore**, on local disk and on S3 (SeaweedFS on 127.0.0.1), against the
   paths in ``bench.ckpt_paths``: ``np.savez``/``np.load``, ``torch.save``/``torch.load``,
   ``safetensors.numpy``, ``torch.distributed.checkpoint`` (one process, no process group;
   on S3 through s3fs and through s3torchconnector's ``S3StorageWriter``/``Reader``),
   s3torchconnector's ``S3Checkpoint``, tensorstore zarr3 on its s3 kvstore (with and
   without OCDBT), and the transports alone - a plain write + fsync / ``readinto`` on local
   disk, one boto3 ``put_object``/``get_object``, obstore's one PUT/GET and its multipart
   upload / ``get_ranges``. Local peers fsync what they write (as cloudckpt's local
   backend does). Every restore is checked value for value against the state (untimed),
   so a path that silently restores nothing fails the run.
2. **Async save**: how long ``Checkpoint.write(..., CheckpointOptions(enable_async=True))``
   blocks its caller, against one in-memory copy of the state (``np.copyto`` into
   preallocated arrays) - the least an async save that snapshots can block.
3. **Peak extra memory of a save**, in a fresh subprocess per path: the high-water mark
   of its RSS during the save (reset just before it) minus its RSS before the save.
4. **First request**: in a fresh process per path and direction, building the path
   (client creation included) plus its first 4 MiB save to a new bucket (or directory),
   then, in another fresh process, its first restore of it - what a new or resumed job
   pays before its first checkpoint moves. Imports are done before the clock starts.

Each timed path runs ``--repeat`` times, interleaved with the other paths (so a noisy
moment hits one run of every path, not every run of one); the best run counts. Ratios are
cloudckpt's against each peer's in the same run (``ours ÷ this``: the peer's time over
ours, above 1 is faster) and against the best peer, not the slowest. The load average is
printed at the start and at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.ckpt_paths import (
    PathSpec,
    SavePath,
    Setup,
    State,
    as_tensors,
    fsync_path,
    local_specs,
    put_buffer,
    s3_client,
    s3_delete_prefix,
    s3_specs,
)

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
#: Bounded wait for one memory-measuring subprocess (imports torch, builds the state, saves once).
CHILD_TIMEOUT = 900.0


# --------------------------------------------------------------------------- the state
def make_state(total_bytes: int, seed: int = 0, layers: int = 40, width: int = 1024) -> State:
    """A model + Adam-optimizer-shaped dict of float32 arrays, about ``total_bytes`` in all.

    Why this shape: real training state is a few huge matrices and many tiny vectors, and
    per-array overheads (headers, requests, Python calls) only show with the tiny ones.
    Each layer has a weight ``(rows, width)`` whose rows are log-uniform (1..64 relative),
    a bias ``(rows,)`` and a norm scale ``(width,)``; the optimizer has ``exp_avg`` and
    ``exp_avg_sq`` of each, so ``9 * layers`` arrays. Values are seeded normals, written in
    place (no temporary as large as the state).
    """
    rng = np.random.default_rng(seed)
    floats = total_bytes // 4
    budget = max(floats // 3 - layers * width, layers * (width + 1))
    relative = np.exp(rng.uniform(0.0, np.log(64.0), layers))
    rows = np.maximum(1, np.round(relative / relative.sum() * budget / (width + 1))).astype(int)
    params: dict[str, tuple[int, ...]] = {}
    for i, r in enumerate(rows):
        params[f"model.layers.{i:02d}.weight"] = (int(r), width)
        params[f"model.layers.{i:02d}.bias"] = (int(r),)
        params[f"model.layers.{i:02d}.norm.scale"] = (width,)
    state: State = {}
    for prefix in ("", "optimizer.exp_avg.", "optimizer.exp_avg_sq."):
        for name, shape in params.items():
            array = np.empty(shape, dtype=np.float32)
            rng.standard_normal(out=array, dtype=np.float32)
            state[prefix + name] = array
    return state


def state_bytes(state: Mapping[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in state.values())


def verify(restored: Mapping[str, Any], state: State, label: str) -> None:
    """Every key, shape, dtype and value equal; ``AssertionError`` naming the first difference.

    Why a full compare, untimed: a sample can miss a restore that fills only part of an
    array; comparing 1 GiB costs well under a second and keeps every number honest.
    """
    if set(restored) != set(state):
        missing = sorted(set(state) - set(restored))[:3]
        extra = sorted(set(restored) - set(state))[:3]
        raise AssertionError(f"{label}: restored keys differ (missing {missing}, unexpected {extra})")
    for key, expected in state.items():
        got = np.asarray(restored[key])
        if got.dtype != expected.dtype or got.shape != expected.shape or not np.array_equal(got, expected):
            raise AssertionError(f"{label}: {key} restored wrong ({got.dtype}{got.shape} vs "
                                 f"{expected.dtype}{expected.shape})")


# --------------------------------------------------------------------------- measuring
def warm_up_disk(state: State, root: Path) -> None:
    """Write the state once to a plain file, fsync, delete - untimed.

    Why: the first large write of a run pays for turning free memory into page cache and
    for writeback of whatever ran before (measured here: a plain 1 GiB write + fsync took
    2.6 s cold and 0.9 s right after); without this, whichever path ran first would pay.
    """
    path = root / "warm-up.bin"
    with open(path, "wb") as f:
        for array in state.values():
            f.write(memoryview(array).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


@dataclass
class Timing:
    path: SavePath
    save: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def measure_paths(paths: list[SavePath], state: State, repeat: int) -> list[Timing]:
    """Save round-robin ``repeat`` times, then restore round-robin from the last save, verifying each.

    Why round-robin: other processes come and go on this machine; interleaving spreads a
    disturbance over one run of every path instead of all runs of one.
    """
    timings = [Timing(p) for p in paths]
    for i in range(repeat):
        for t in timings:
            if i > 0:
                t.path.clear(i - 1)
            seconds, _ = timed(lambda t=t, i=i: t.path.save(i))
            t.save.append(seconds)
            print(f"  {t.path.target} save    {t.path.name}: {seconds:.2f} s", flush=True)
    last = repeat - 1
    for _ in range(repeat):
        for t in timings:
            t.path.before_restore()
            seconds, restored = timed(lambda t=t: t.path.restore(last))
            verify(restored, state, f"{t.path.target} {t.path.name}")
            del restored
            t.restore.append(seconds)
            print(f"  {t.path.target} restore {t.path.name}: {seconds:.2f} s (verified)", flush=True)
    for t in timings:
        t.path.clear(last)
    return timings


@dataclass
class AsyncResult:
    target: str
    copy_first: float
    copy_best: float
    blocked_first: float
    blocked_best: float
    total_best: float


def measure_copy(state: State, repeat: int) -> tuple[float, float]:
    """Seconds of one ``np.copyto`` of the state: into fresh arrays, then best of ``repeat`` into the same ones."""
    target = {k: np.empty_like(v) for k, v in state.items()}

    def copy_all() -> None:
        for k, v in state.items():
            np.copyto(target[k], v)

    first, _ = timed(copy_all)
    best = min(timed(copy_all)[0] for _ in range(repeat))
    return first, best


def measure_async(state: State, dest: State, repeat: int, location: Callable[[int], str],
                  clear: Callable[[int], None]) -> AsyncResult:
    """Caller-blocked time of async saves vs one ``np.copyto`` of the state.

    The first async save of a ``Checkpoint`` allocates its staging buffer (page faults
    while it copies), later ones reuse it; the copy baseline is likewise measured into a
    fresh destination and into one already touched, and ratios pair like with like.
    After the last save returns, the largest array is overwritten before ``sync()``: the
    restored checkpoint must still hold the old values (the save was a real snapshot).
    """
    import cloudckpt

    copy_first, copy_best = measure_copy(state, repeat)

    ckpt = cloudckpt.Checkpoint(state=state)
    options = cloudckpt.CheckpointOptions(enable_async=True)
    blocked: list[float] = []
    totals: list[float] = []
    largest = max(state, key=lambda k: state[k].nbytes)
    saved_largest = state[largest].copy()
    try:
        for i in range(repeat + 1):
            if i > 0:
                clear(i - 1)
            gc.collect()
            started = time.perf_counter()
            ckpt.write(location(i), options=options)
            blocked.append(time.perf_counter() - started)
            if i == repeat:
                state[largest].fill(-1.0)  # mutate after the caller was released: must not reach the checkpoint
            ckpt.sync()
            totals.append(time.perf_counter() - started)
            print(f"  async save {i}: blocked {blocked[-1]:.3f} s, done after {totals[-1]:.2f} s", flush=True)
    finally:
        np.copyto(state[largest], saved_largest)
        ckpt.close()
    for array in dest.values():
        array.fill(0)
    cloudckpt.Checkpoint(state=dest).read(location(repeat)).assert_consumed()
    verify(dest, state, "async save")
    clear(repeat)
    return AsyncResult("", copy_first, copy_best, blocked[0], min(blocked[1:]), min(totals[1:]))


# --------------------------------------------------------------------------- memory (subprocess)
def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_METHODS: dict[str, tuple[str, str]] = {
    # method: (target, label)
    "ours-sync-local": ("local", "cloudckpt Checkpoint.write (sync)"),
    "ours-async-local": ("local", "cloudckpt Checkpoint.write (async, incl. sync())"),
    "npz-local": ("local", "np.savez to file"),
    "torch-local": ("local", "torch.save to file"),
    "st-local": ("local", "safetensors.numpy.save_file"),
    "dcp-local": ("local", "torch DCP FileSystemWriter"),
    "ours-sync-s3": ("s3", "cloudckpt Checkpoint.write (sync)"),
    "torch-s3": ("s3", "torch.save to memory + put_object"),
    "st-s3": ("s3", "safetensors.numpy.save + put_object"),
    "dcp-s3": ("s3", "torch DCP FsspecWriter over s3fs"),
}


def _memory_saver(method: str, root: str, endpoint: str, bucket: str) -> Callable[[State, str], None]:
    """The save function of ``method``; ``tag`` picks a fresh location for each call."""
    import torch.distributed.checkpoint as dcp

    import cloudckpt

    if method.startswith("ours-"):
        asynchronous = method.startswith("ours-async")
        options = cloudckpt.CheckpointOptions(enable_async=asynchronous)

        def ours(state: State, tag: str) -> None:
            base = f"s3://{bucket}/mem-{tag}" if method.endswith("-s3") else f"{root}/mem-{tag}"
            with cloudckpt.Checkpoint(state=state) as ckpt:  # close() waits for an async save
                ckpt.write(f"{base}/ckpt", options=options)
        return ours
    if method == "npz-local":
        def npz(state: State, tag: str) -> None:
            with open(f"{root}/mem-{tag}.npz", "wb") as f:
                np.savez(f, **state)
                f.flush()
                os.fsync(f.fileno())
        return npz
    if method == "torch-local":
        import torch

        def torch_file(state: State, tag: str) -> None:
            with open(f"{root}/mem-{tag}.pt", "wb") as f:
                torch.save(as_tensors(state), f)
                f.flush()
                os.fsync(f.fileno())
        return torch_file
    if method == "st-local":
        import safetensors.numpy

        def st_file(state: State, tag: str) -> None:
            safetensors.numpy.save_file(state, f"{root}/mem-{tag}.safetensors")
            fsync_path(Path(f"{root}/mem-{tag}.safetensors"))
        return st_file
    if method == "dcp-local":
        def dcp_file(state: State, tag: str) -> None:
            dcp.save(as_tensors(state), storage_writer=dcp.FileSystemWriter(f"{root}/mem-{tag}"), no_dist=True)
        return dcp_file
    client = s3_client(endpoint)
    if method == "torch-s3":
        import torch

        def torch_s3(state: State, tag: str) -> None:
            buffer = io.BytesIO()
            torch.save(as_tensors(state), buffer)
            put_buffer(client, bucket, f"mem-{tag}/state.pt", buffer)
        return torch_s3
    if method == "st-s3":
        import safetensors.numpy

        def st_s3(state: State, tag: str) -> None:
            client.put_object(Bucket=bucket, Key=f"mem-{tag}/state.safetensors", Body=safetensors.numpy.save(state))
        return st_s3
    if method == "dcp-s3":
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        def dcp_s3(state: State, tag: str) -> None:
            writer = FsspecWriter(f"s3://{bucket}/mem-{tag}", sync_files=False, endpoint_url=endpoint)
            dcp.save(as_tensors(state), storage_writer=writer, no_dist=True)
        return dcp_s3
    raise ValueError(f"unknown memory method {method!r}")


def memory_child(spec_json: str) -> int:
    """Subprocess entry: build the state, warm the path up, then save once and report peak RSS.

    Why a warm-up save (of a tiny state, same path): the first call imports modules and
    builds clients and thread pools; that is a one-off cost of the process, not memory the
    save of a large state needs. The peak is reset after the warm-up and the state's build.
    """
    spec = json.loads(spec_json)
    save = _memory_saver(spec["method"], spec["root"], spec["endpoint"], spec["bucket"])
    state = make_state(spec["size"], seed=1)
    save(make_state(4 * MiB, seed=2, layers=4, width=64), "warmup")
    gc.collect()
    before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    started = time.perf_counter()
    save(state, "measured")
    seconds = time.perf_counter() - started
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"before_kib": before, "peak_kib": peak, "reset": reset, "seconds": seconds,
                      "state_bytes": state_bytes(state)}))
    return 0


@dataclass
class MemoryResult:
    target: str
    label: str
    ours: bool
    state_bytes: int
    extra_bytes: int
    seconds: float
    reset: bool

    @property
    def percent(self) -> float:
        return 100.0 * self.extra_bytes / self.state_bytes


def measure_memory(method: str, size: int, root: Path, endpoint: str, bucket: str) -> MemoryResult:
    """Run ``memory_child`` in a fresh interpreter (bounded wait) and parse its one JSON line."""
    spec = json.dumps({"method": method, "size": size, "root": str(root), "endpoint": endpoint, "bucket": bucket})
    code = "import sys; from bench.bench_checkpoint import memory_child; sys.exit(memory_child(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, spec], cwd=REPO, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    target, label = MEMORY_METHODS[method]
    result = MemoryResult(target, label, method.startswith("ours-"), out["state_bytes"],
                          (out["peak_kib"] - out["before_kib"]) * 1024, out["seconds"], out["reset"])
    print(f"  memory {target} {label}: +{result.extra_bytes / MiB:.0f} MiB ({result.percent:.1f} %)", flush=True)
    return result


# --------------------------------------------------------------------------- first request (subprocess)
#: The first-request row's state: 72 float32 arrays, 4 MiB in all.
FIRST_BYTES = 4 * MiB


def first_state() -> State:
    return make_state(FIRST_BYTES, seed=3, layers=8, width=256)


def first_child(spec_json: str) -> int:
    """Subprocess entry: time building one path (its clients) plus its first save, or its first restore.

    Imports and the state are made before the clock starts: they are the process's, not
    the request's. The restore child runs in another fresh process after the save child,
    as a resumed job would, and checks every value it read (untimed).
    """
    spec = json.loads(spec_json)
    path_spec = next(p for p in local_specs(1) + s3_specs(1) if p.key == spec["key"])
    for module in path_spec.modules:
        importlib.import_module(module)
    state = first_state()
    setup = Setup(state, {k: np.zeros_like(v) for k, v in state.items()}, Path(spec["root"]), spec["endpoint"],
                  spec["bucket"])
    setup.blob()
    gc.collect()
    started = time.perf_counter()
    path = path_spec.factory(setup)
    if spec["phase"] == "save":
        path.save(0)
        seconds = time.perf_counter() - started
    else:  # the destination is fresh zeros: no before_restore needed
        restored = path.restore(0)
        seconds = time.perf_counter() - started
        verify(restored, state, f"first restore {path.name}")
    print(json.dumps({"seconds": seconds, "name": path.name, "ours": path.ours}))
    return 0


@dataclass
class FirstResult:
    target: str
    label: str
    ours: bool
    save: float
    restore: float


def measure_first(spec: PathSpec, root: Path, endpoint: str, bucket: str) -> FirstResult:
    """Run ``first_child`` for the save, then for the restore, each in a fresh interpreter (bounded wait)."""
    out: dict[str, dict[str, Any]] = {}
    for phase in ("save", "restore"):
        child = json.dumps({"key": spec.key, "phase": phase, "root": str(root), "endpoint": endpoint,
                            "bucket": bucket})
        code = "import sys; from bench.bench_checkpoint import first_child; sys.exit(first_child(sys.argv[1]))"
        proc = subprocess.run([sys.executable, "-c", code, child], cwd=REPO, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"first-request child {spec.key} {phase} failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        out[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
    result = FirstResult(spec.target, out["save"]["name"], out["save"]["ours"], out["save"]["seconds"],
                         out["restore"]["seconds"])
    print(f"  first request {spec.target} {result.label}: save {result.save:.3f} s, restore {result.restore:.3f} s",
          flush=True)
    return result


# --------------------------------------------------------------------------- reporting
def rate(size: int, seconds: float) -> float:
    return size / MiB / seconds


def report_timings(timings: list[Timing], size: int) -> tuple[str, list[str]]:
    """The markdown table and the summary lines: ours against the best peer and against each one.

    ``ours ÷ this`` is this path's best time over cloudckpt's (above 1: cloudckpt is faster);
    on cloudckpt's own row it is against the best peer.
    """
    lines = ["| target | op | path | durability | restore | best s | MiB/s | ours ÷ this |",
             "|---|---|---|---|---|---:|---:|---:|"]
    summary = []
    for target in dict.fromkeys(t.path.target for t in timings):
        group = [t for t in timings if t.path.target == target]
        for op in ("save", "restore"):
            best = {id(t): min(getattr(t, op)) for t in group}
            peers = [t for t in group if not t.path.ours]
            ours = next((t for t in group if t.path.ours), None)
            for t in group:
                ratio = ""
                if ours is not None and peers:
                    if t.path.ours:
                        best_peer = min(peers, key=lambda p: best[id(p)])
                        value = best[id(best_peer)] / best[id(t)]
                        ratio = f"**{value:.2f}x** (best peer)"
                        summary.append(f"{target} {op}: cloudckpt {rate(size, best[id(t)]):.0f} MiB/s = {value:.2f}x "
                                       f"the best peer ({best_peer.path.name}, {rate(size, best[id(best_peer)]):.0f} "
                                       f"MiB/s)")
                    else:
                        ratio = f"{best[id(t)] / best[id(ours)]:.2f}x"
                lines.append(f"| {target} | {op} | {t.path.name} | {t.path.durability} | {t.path.loading} | "
                             f"{best[id(t)]:.2f} | {rate(size, best[id(t)]):.0f} | {ratio} |")
    return "\n".join(lines), summary


def report_first(results: list[FirstResult]) -> tuple[str, list[str]]:
    """Seconds of client creation + the first 4 MiB save / restore; ratios are peer s ÷ ours s."""
    lines = ["| target | path | first save s | first restore s | ours ÷ this, save | ours ÷ this, restore |",
             "|---|---|---:|---:|---:|---:|"]
    summary = []
    for target in dict.fromkeys(r.target for r in results):
        group = [r for r in results if r.target == target]
        ours = next((r for r in group if r.ours), None)
        for r in group:
            ratios = ("", "") if ours is None or r.ours else (f"{r.save / ours.save:.2f}x",
                                                               f"{r.restore / ours.restore:.2f}x")
            lines.append(f"| {target} | {r.label} | {r.save:.3f} | {r.restore:.3f} | {ratios[0]} | {ratios[1]} |")
        peers = [r for r in group if not r.ours]
        if ours is not None and peers:
            fastest_save = min(peers, key=lambda r: r.save)
            fastest_restore = min(peers, key=lambda r: r.restore)
            summary.append(f"{target} first request: cloudckpt save {ours.save:.3f} s = "
                           f"{ours.save / fastest_save.save:.1f}x the fastest peer's ({fastest_save.label}, "
                           f"{fastest_save.save:.3f} s); restore {ours.restore:.3f} s = "
                           f"{ours.restore / fastest_restore.restore:.1f}x ({fastest_restore.label}, "
                           f"{fastest_restore.restore:.3f} s)")
    return "\n".join(lines), summary


def report_async(results: list[AsyncResult]) -> tuple[str, list[str]]:
    lines = ["| target | copy, fresh dest (s) | copy, reused dest (s) | async blocked, 1st save (s) | "
             "async blocked, later saves (s) | blocked / copy (later) | blocked / copy (1st) | "
             "async save done (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for r in results:
        later = r.blocked_best / r.copy_best
        first = r.blocked_first / r.copy_first
        lines.append(f"| {r.target} | {r.copy_first:.3f} | {r.copy_best:.3f} | {r.blocked_first:.3f} | "
                     f"{r.blocked_best:.3f} | **{later:.2f}x** | {first:.2f}x | {r.total_best:.2f} |")
        summary.append(f"{r.target} async save: caller blocked {r.blocked_best:.3f} s = {later:.2f}x one in-memory "
                       f"copy ({r.copy_best:.3f} s); first save {r.blocked_first:.3f} s = {first:.2f}x a copy into "
                       f"fresh memory ({r.copy_first:.3f} s)")
    return "\n".join(lines), summary


def report_memory(results: list[MemoryResult]) -> tuple[str, list[str]]:
    lines = ["| target | path | state MiB | peak extra RSS MiB | % of state | save s |",
             "|---|---|---:|---:|---:|---:|"]
    summary = []
    for r in results:
        pct = f"**{r.percent:.1f} %**" if r.ours else f"{r.percent:.1f} %"
        lines.append(f"| {r.target} | {r.label} | {r.state_bytes / MiB:.0f} | {r.extra_bytes / MiB:.0f} | {pct} | "
                     f"{r.seconds:.2f} |")
        if r.ours:
            goal = "target <= 10 %" if "(sync)" in r.label else "includes the staging copy, ~100 % by design"
            summary.append(f"{r.target} {r.label}: peak extra memory {r.extra_bytes / MiB:.0f} MiB = "
                           f"{r.percent:.1f} % of the state ({goal})")
    if not all(r.reset for r in results):
        summary.append("warning: VmHWM could not be reset; the peaks include building the state")
    return "\n".join(lines), summary


# --------------------------------------------------------------------------- main
def revision(root: Path = REPO) -> str:
    """The commit of the library at ``root``, and whether its cloudckpt/ has uncommitted changes.

    Why: the numbers depend on the library's state (other work may be uncommitted); read-only
    git calls, "unknown" where git cannot tell.
    """
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "cloudckpt").splitlines()]
    return commit + (f" + uncommitted changes in {len(dirty)} cloudckpt file(s)" if dirty else "")


def use_bench_credentials() -> None:
    """The credentials and region the bench's local S3 servers accept, unless the caller set others."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def describe_run(root: Path = REPO) -> str:
    """Revision and load of the machine, printed with the tables: what else ran on the 2 cores
    belongs next to the numbers as much as the library's state does."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"cloudckpt at {revision(root)}; load average {load}"


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[str]:
    """SeaweedFS on 127.0.0.1 through the tests' launcher (stopped by its PID); yields the endpoint."""
    with seaweedfs_server(root) as server:
        yield server.endpoint


@contextlib.contextmanager
def seaweedfs_server(root: Path) -> Iterator[Any]:
    """The same, yielding the tests' ``Server`` (its master too: ``reclaim_deleted_space``)."""
    sys.path.insert(0, str(REPO / "tests"))
    import servers

    with servers.seaweedfs(root / "weed") as server:
        yield server


def clear_async(client: Any, bucket: str, server: Any, i: int) -> None:
    """Delete the ``i``-th async save and give its disk back."""
    s3_delete_prefix(client, bucket, f"async-{i}/")
    reclaim_deleted_space(server)


def reclaim_deleted_space(server: Any) -> None:
    """Vacuum SeaweedFS now (untimed, between runs): deleted checkpoints keep their disk until then.

    Then ``os.sync()``: the vacuum rewrites volumes and the last run leaves dirty pages; flushed
    here, neither is written back inside the next path's timed run (round-robin, so it would
    land on whichever path comes next).
    """
    sys.path.insert(0, str(REPO / "tests"))
    import servers

    servers.reclaim_deleted_space(server)
    os.sync()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="state size (default 1024 = 1 GiB)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per path; the best counts (default 2)")
    parser.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, one repeat")
    parser.add_argument("--dcp-threads", type=int, default=4,
                        help="also run DCP with this many writer threads (cloudckpt uses 4); 1 = default only")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: timing, async, memory, first")
    parser.add_argument("--paths", default="",
                        help="comma-separated path keys to time (default: all; see --list-paths)")
    parser.add_argument("--list-paths", action="store_true", help="print the path keys and exit")
    args = parser.parse_args(argv)
    if args.list_paths:
        for spec in local_specs(args.dcp_threads) + s3_specs(args.dcp_threads):
            print(spec.key)
        return 0
    if args.quick:
        args.size_mib, args.repeat = 64, 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - {"local", "s3"}
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}")
    skip = set(args.skip.split(",")) - {""}
    wanted = set(args.paths.split(",")) - {""}
    known = {spec.key for spec in local_specs(args.dcp_threads) + s3_specs(args.dcp_threads)}
    if wanted - known:
        parser.error(f"unknown paths {sorted(wanted - known)} (see --list-paths)")

    def chosen(specs: list[PathSpec]) -> list[PathSpec]:
        return [spec for spec in specs if not wanted or spec.key in wanted or spec.key.endswith("-ours")]

    use_bench_credentials()
    started_as = describe_run()
    print(started_as, flush=True)
    print(f"building {args.size_mib} MiB of state ...", flush=True)
    state = make_state(args.size_mib * MiB)
    size = state_bytes(state)
    dest = {k: np.zeros_like(v) for k, v in state.items()}
    sizes = [a.nbytes for a in state.values()]
    print(f"  {len(state)} float32 arrays, {size / MiB:.1f} MiB, largest {max(sizes) / MiB:.1f} MiB, smallest "
          f"{min(sizes)} bytes", flush=True)

    timings: list[Timing] = []
    async_results: list[AsyncResult] = []
    memory: list[MemoryResult] = []
    firsts: list[FirstResult] = []
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-ckpt-", dir=REPO) as tmp:
        root = Path(tmp)
        if "local" in backends:
            local_root = root / "local"
            local_root.mkdir()
            if "timing" not in skip:
                print("local disk: save / restore (after an untimed warm-up write) ...", flush=True)
                warm_up_disk(state, local_root)
                setup = Setup(state, dest, local_root)
                paths = [spec.factory(setup) for spec in chosen(local_specs(args.dcp_threads))]
                timings += measure_paths(paths, state, args.repeat)
                del setup, paths
            if "async" not in skip:
                print("local disk: async save ...", flush=True)
                result = measure_async(state, dest, args.repeat, lambda i: str(local_root / f"async-{i}" / "ckpt"),
                                       lambda i: shutil.rmtree(local_root / f"async-{i}", ignore_errors=True))
                result.target = "local"
                async_results.append(result)
        if "s3" in backends:
            with seaweedfs_server(root) as server:
                endpoint = server.endpoint
                print(f"SeaweedFS at {endpoint} ...", flush=True)
                os.environ["AWS_ENDPOINT_URL"] = endpoint  # how cloudckpt (and boto3) find it
                bucket = f"bench-{uuid.uuid4().hex[:10]}"
                client = s3_client(endpoint)
                client.create_bucket(Bucket=bucket)
                if "timing" not in skip:
                    print("S3: save / restore ...", flush=True)
                    setup = Setup(state, dest, root, endpoint, bucket,
                                  reclaim=functools.partial(reclaim_deleted_space, server))
                    paths = [spec.factory(setup) for spec in chosen(s3_specs(args.dcp_threads))]
                    timings += measure_paths(paths, state, args.repeat)
                    del setup, paths
                if "async" not in skip:
                    print("S3: async save ...", flush=True)
                    result = measure_async(state, dest, args.repeat, lambda i: f"s3://{bucket}/async-{i}/ckpt",
                                           functools.partial(clear_async, client, bucket, server))
                    result.target = "s3"
                    async_results.append(result)
                if "memory" not in skip:
                    del dest
                    gc.collect()
                    print("S3: peak memory of one save (fresh subprocess each) ...", flush=True)
                    for method, (target, _) in MEMORY_METHODS.items():
                        if target == "s3":
                            memory.append(measure_memory(method, size, root, endpoint, bucket))
                            s3_delete_prefix(client, bucket, "mem-")
                if "first" not in skip:
                    print("S3: first request of a process (fresh subprocess per save and per restore) ...", flush=True)
                    for spec in chosen(s3_specs(1)):
                        first_bucket = f"first-{spec.key.removeprefix('s3-')}-{uuid.uuid4().hex[:8]}"
                        # A bucket new to the process, but warmed on the server: SeaweedFS's first write to a
                        # bucket allocates its volumes (~1 s here), a server cost every path would pay by lot.
                        client.create_bucket(Bucket=first_bucket)
                        client.put_object(Bucket=first_bucket, Key="warm-up", Body=b"x")
                        client.delete_object(Bucket=first_bucket, Key="warm-up")
                        firsts.append(measure_first(spec, root, endpoint, first_bucket))
        if "local" in backends and "memory" not in skip:
            print("local disk: peak memory of one save (fresh subprocess each) ...", flush=True)
            mem_root = root / "mem"
            for method, (target, _) in MEMORY_METHODS.items():
                if target == "local":
                    mem_root.mkdir()
                    memory.append(measure_memory(method, size, mem_root, "", ""))
                    shutil.rmtree(mem_root)
        if "local" in backends and "first" not in skip:
            print("local disk: first request of a process (fresh subprocess per save and per restore) ...", flush=True)
            for spec in chosen(local_specs(1)):
                first_root = root / f"first-{spec.key}"
                first_root.mkdir()
                firsts.append(measure_first(spec, first_root, "", ""))
                shutil.rmtree(first_root)

    summary: list[str] = []
    print()
    print(f"{len(state)} float32 arrays, {size / MiB:.0f} MiB, best of {args.repeat}, {os.cpu_count()} cores")
    print(f"at start: {started_as}")
    print(f"at end:   {describe_run()}")
    if timings:
        table, lines = report_timings(timings, size)
        print()
        print(table)
        summary += lines
    if async_results:
        table, lines = report_async(async_results)
        print()
        print(table)
        summary += lines
    if memory:
        table, lines = report_memory(sorted(memory, key=lambda m: m.target != "local"))
        print()
        print(table)
        summary += lines
    if firsts:
        table, lines = report_first(sorted(firsts, key=lambda f: f.target != "local"))
        print()
        print(table)
        summary += lines
    print()
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
