"""GPU benchmark (issue 24): device tensors at the speed of the bus - or, without a GPU, the CPU copier.

One command (``./run bench gpu``, ``python -m bench gpu``), prepared to fit 5 minutes on one
H100. It prints the device, torch and driver versions and the copier cloudckpt used, then,
for each ``--size`` (default 2 and 8 GiB on a GPU, 64 MiB without one) of bf16 parameters
with fp32 Adam state (exp_avg, exp_avg_sq: 10 bytes a parameter, 64 MiB matrices):

1. the limit: a device-to-host copy of the whole state into pinned memory (torch's allocator), into
   an anonymous mapping registered in place (``cudaHostRegister``: how cloudckpt pins its async
   staging area - the issue's "measure which") and into pageable memory, GB/s;
2. async save to local disk, the caller's blocked time: cloudckpt (``enable_async``, its
   staging budget set to the state's size and reserved ahead, as ``CheckpointManager`` does)
   vs ``dcp.async_save`` with ``DefaultStager`` (pinned, non-blocking copies; blocked = until
   its staging completed; one untimed save first fills its cache of pinned buffers) vs
   ``torch.save({k: v.cpu()})`` (blocked for all of it); and the peak extra host memory of
   cloudckpt's async save (resident set size sampled every 2 ms) over the state's bytes;
3. sync save to local disk (a temp dir) and to tmpfs (``/dev/shm``): cloudckpt vs ``dcp.save``;
4. restore into device tensors: cloudckpt vs ``dcp.load`` vs ``torch.load(map_location=device)``;
5. a bit-exact check of every case (untimed): each saved checkpoint restored and compared
   bit for bit, each restore compared bit for bit.

Without CUDA, the device is the CPU and cloudckpt's path is forced through the device
pipeline (``use_copier(ThreadCopier(), cpu_tensors=True)``): the figures then say nothing of a
GPU - they show the command runs and the pipeline is bit-exact. Each case runs
``--repeat`` times; the best time counts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

import cloudckpt
from bench.bench_checkpoint import describe_run
from bench.bench_dcp import PeakRss
from cloudckpt.adapters.torch_device import chosen_copier, use_copier
from cloudckpt.leaves.copier import Copier, ThreadCopier
from cloudckpt.saving.async_save import _prefaulted

MiB = 1024 * 1024
GiB = 1024 * MiB
MATRIX = 4096 * 2048  # parameters per matrix: 16 MiB of bf16, 32 MiB per Adam moment


def make_state(nbytes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """bf16 parameters and fp32 Adam moments, ``nbytes`` in all (10 bytes a parameter)."""
    params = max(1, nbytes // 10)
    state: dict[str, torch.Tensor] = {}
    g = torch.Generator(device=device).manual_seed(0)
    i = 0
    while params > 0:
        n = min(MATRIX, params)
        rows = max(1, n // 2048)
        shape = (rows, n // rows)
        state[f"layer{i}.weight"] = torch.randn(shape, generator=g, device=device).to(torch.bfloat16)
        state[f"layer{i}.exp_avg"] = torch.randn(shape, generator=g, device=device)
        state[f"layer{i}.exp_avg_sq"] = torch.rand(shape, generator=g, device=device)
        params -= shape[0] * shape[1]
        i += 1
    return state


def nbytes_of(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Every tensor equal bit for bit (bytes compared, so NaN payloads count)."""
    for key, value in a.items():
        other = b[key]
        if other.dtype != value.dtype or other.shape != value.shape:
            return False
        x = value.detach().contiguous().reshape(-1).view(torch.uint8)
        y = other.detach().to(value.device).contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(x, y):
            return False
    return True


def best(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def copy_gbps(state: dict[str, torch.Tensor], device: torch.device, memory: str, repeat: int,
              copier: Copier | None = None) -> float | None:
    """Device-to-host copy of every tensor into one host buffer, GB/s. ``memory``: ``pinned`` (torch's
    pinned allocator), ``pageable``, or ``registered`` (an anonymous mapping like cloudckpt's staging,
    page-locked in place by ``copier.pin``: ``cudaHostRegister``). ``None`` where it cannot run."""
    if memory != "pageable" and device.type != "cuda":
        return None
    total = nbytes_of(state)
    size = total + 64 * len(state)
    registered = None
    if memory == "registered":
        assert copier is not None
        registered = _prefaulted(size)
        copier.pin(registered)
        host = torch.from_numpy(registered)
    else:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=memory == "pinned")
        host.fill_(0)  # fault the pages in: the copy, not the first touch, is timed
    non_blocking = memory != "pageable"

    def run() -> float:
        sync(device)
        started = time.perf_counter()
        at = 0
        for t in state.values():
            n = t.numel() * t.element_size()
            host[at:at + n].view(t.dtype).view(t.shape).copy_(t, non_blocking=non_blocking)
            at += -(-n // 64) * 64
        sync(device)
        return time.perf_counter() - started

    try:
        return total / best(repeat, run) / 1e9
    finally:
        if registered is not None and copier is not None:
            copier.unpin(registered)


def dest_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


Timed = tuple[float, dict[str, torch.Tensor]]


def ours_restore(path: str, like: dict[str, torch.Tensor], device: torch.device) -> Timed:
    dest = dest_like(like)
    sync(device)
    started = time.perf_counter()
    cloudckpt.Checkpoint(model=dest).restore(path)
    sync(device)
    return time.perf_counter() - started, dest


def dcp_restore(path: str, like: dict[str, torch.Tensor], device: torch.device) -> Timed:
    dest = dest_like(like)
    sync(device)
    started = time.perf_counter()
    dcp_load(dest, storage_reader=FileSystemReader(path), no_dist=True)
    sync(device)
    return time.perf_counter() - started, dest


def torch_restore(path: str, device: torch.device) -> Timed:
    sync(device)
    started = time.perf_counter()
    loaded: dict[str, torch.Tensor] = torch.load(path, map_location=device, weights_only=True)
    sync(device)
    return time.perf_counter() - started, loaded


def run_size(nbytes: int, device: torch.device, copier: Copier, root: Path, shm: Path | None,
             repeat: int) -> list[tuple[str, str]]:
    """Every case for one state size: ``(name, figure)`` rows."""
    state = make_state(nbytes, device)
    total = nbytes_of(state)
    gb = total / 1e9
    rows: list[tuple[str, str]] = [("state", f"{total / GiB:.2f} GiB in {len(state)} tensors")]
    exact: list[str] = []
    pinned = copy_gbps(state, device, "pinned", repeat)
    registered = copy_gbps(state, device, "registered", repeat, copier)
    pageable = copy_gbps(state, device, "pageable", repeat)
    limit = gb / pinned if pinned else gb / pageable if pageable else float("nan")
    rows.append(("D2H copy pinned", "n/a (no CUDA)" if pinned is None else f"{pinned:.1f} GB/s ({gb / pinned:.3f} s)"))
    rows.append(("D2H copy registered mapping (staging)", "n/a (no CUDA)" if registered is None
                 else f"{registered:.1f} GB/s ({gb / registered:.3f} s)"))
    rows.append(("D2H copy pageable", f"{pageable:.1f} GB/s ({gb / pageable:.3f} s)" if pageable else "n/a"))

    # 2. async save, caller-blocked time
    options = cloudckpt.CheckpointOptions(enable_async=True, async_staging_budget=total + 64 * MiB)
    ours_blocked: list[float] = []
    peak_extra = 0
    ours_path = ""
    with use_copier(copier, cpu_tensors=device.type == "cpu"):
        ckpt = cloudckpt.Checkpoint(model=state)
        with PeakRss() as whole:  # the staging area included: allocated by the reserve
            ckpt.reserve_async_staging(options)  # as CheckpointManager does: ready before the first save
            for _ in range(repeat):
                shutil.rmtree(root / "ours-async", ignore_errors=True)
                sync(device)
                started = time.perf_counter()
                ours_path = ckpt.write(str(root / "ours-async"), options=options)
                ours_blocked.append(time.perf_counter() - started)
                ckpt.sync()
        peak_extra = whole.extra
        ckpt.close()
        _, back = ours_restore(ours_path, state, device)
    exact.append(f"cloudckpt async {'ok' if bits_equal(state, back) else 'DIFFERS'}")
    del back
    stager = DefaultStager(StagingOptions(use_pinned_memory=device.type == "cuda", use_shared_memory=False,
                                          use_async_staging=True, use_non_blocking_copy=device.type == "cuda"))
    dcp_blocked = []
    for i in range(repeat + 1):  # the first, untimed, fills DefaultStager's cache of pinned buffers
        shutil.rmtree(root / "dcp-async-0", ignore_errors=True)
        sync(device)
        started = time.perf_counter()
        response = dcp_async_save(state, storage_writer=FileSystemWriter(str(root / "dcp-async-0")),
                                  async_stager=stager, no_dist=True)
        staging = getattr(response, "staging_completion", None)
        if staging is not None:
            staging.result()
        if i:
            dcp_blocked.append(time.perf_counter() - started)
        upload: Any = getattr(response, "upload_completion", response)
        upload.result()
    stager.close()
    _, back = dcp_restore(str(root / "dcp-async-0"), state, device)
    exact.append(f"dcp.async_save {'ok' if bits_equal(state, back) else 'DIFFERS'}")
    del back

    def torch_save() -> float:
        sync(device)
        started = time.perf_counter()
        torch.save({k: v.cpu() for k, v in state.items()}, root / "torch.pt")
        return time.perf_counter() - started

    torch_blocked = best(repeat, torch_save)
    ours = min(ours_blocked)
    rows.append(("async blocked: cloudckpt", f"{ours:.3f} s = {ours / limit:.2f}x the pinned-copy limit"
                 if pinned else f"{ours:.3f} s = {ours / limit:.2f}x a pageable copy"))
    rows.append(("async blocked: dcp.async_save DefaultStager", f"{min(dcp_blocked):.3f} s "
                 f"(cloudckpt / it = {ours / min(dcp_blocked):.2f}x)"))
    rows.append(("async blocked: torch.save({k: v.cpu()})", f"{torch_blocked:.3f} s "
                 f"(cloudckpt / it = {ours / torch_blocked:.3f}x)"))
    rows.append(("async peak extra host memory", f"{peak_extra / GiB:.2f} GiB = {peak_extra / total:.2f}x the state "
                 "(staging area included)"))

    # 3. sync save: local disk and tmpfs
    for where, place in (("local disk", root), ("tmpfs", shm)):
        if place is None:
            rows.append((f"sync save {where}", "n/a (no /dev/shm)"))
            continue
        target = Path(tempfile.mkdtemp(dir=place, prefix="cloudckpt-bench-gpu-"))
        try:
            with use_copier(copier, cpu_tensors=device.type == "cpu"):
                ckpt = cloudckpt.Checkpoint(model=state)
                paths: list[str] = []

                def ours_sync(ckpt: cloudckpt.Checkpoint = ckpt, target: Path = target,
                              paths: list[str] = paths) -> float:
                    sync(device)
                    started = time.perf_counter()
                    paths.append(ckpt.write(str(target / f"ours-{len(paths)}")))
                    return time.perf_counter() - started

                ours_s = best(repeat, ours_sync)
                _, back = ours_restore(paths[-1], state, device)
            exact.append(f"cloudckpt sync {where} {'ok' if bits_equal(state, back) else 'DIFFERS'}")
            del back

            def dcp_sync(target: Path = target) -> float:
                shutil.rmtree(target / "dcp", ignore_errors=True)
                sync(device)
                started = time.perf_counter()
                dcp_save(state, storage_writer=FileSystemWriter(str(target / "dcp")), no_dist=True)
                return time.perf_counter() - started

            dcp_s = best(repeat, dcp_sync)
            rows.append((f"sync save {where}: cloudckpt vs dcp.save",
                         f"{ours_s:.3f} s ({gb / ours_s:.2f} GB/s) vs {dcp_s:.3f} s = {dcp_s / ours_s:.2f}x faster"))
        finally:
            shutil.rmtree(target, ignore_errors=True)

    # 4. restore into device tensors
    with use_copier(copier, cpu_tensors=device.type == "cpu"):
        ours_r, back = min((ours_restore(ours_path, state, device) for _ in range(repeat)), key=lambda r: r[0])
    exact.append(f"cloudckpt restore {'ok' if bits_equal(state, back) else 'DIFFERS'}")
    del back
    dcp_r, back = min((dcp_restore(str(root / "dcp-async-0"), state, device) for _ in range(repeat)),
                      key=lambda r: r[0])
    exact.append(f"dcp.load {'ok' if bits_equal(state, back) else 'DIFFERS'}")
    del back
    torch_r, back = min((torch_restore(str(root / "torch.pt"), device) for _ in range(repeat)), key=lambda r: r[0])
    exact.append(f"torch.load {'ok' if bits_equal(state, back) else 'DIFFERS'}")
    del back
    rows.append(("restore: cloudckpt", f"{ours_r:.3f} s ({gb / ours_r:.2f} GB/s)"))
    rows.append(("restore: dcp.load", f"{dcp_r:.3f} s (cloudckpt speed = {dcp_r / ours_r:.2f}x it)"))
    rows.append(("restore: torch.load(map_location)",
                 f"{torch_r:.3f} s (cloudckpt speed = {torch_r / ours_r:.2f}x it)"))
    rows.append(("bit-exact", ", ".join(exact)))
    return rows


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "n/a"


def parse_size(text: str) -> int:
    units = {"k": 1024, "m": MiB, "g": GiB}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@contextlib.contextmanager
def workdir(parent: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir=parent, prefix="cloudckpt-bench-gpu-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", type=parse_size,
                        help="state size (e.g. 2GiB; repeatable); default 2GiB and 8GiB on a GPU, 64MiB without")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the best counts (default 1)")
    parser.add_argument("--dir", default=None, help="local-disk directory for the checkpoints (default: TMPDIR)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    copier = chosen_copier() if cuda else ThreadCopier()
    sizes = args.size or ([2 * GiB, 8 * GiB] if cuda else [64 * MiB])
    print(f"# bench gpu - {describe_run()}")
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu (no CUDA: not measured on a GPU)'}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}, driver {driver_version()}")
    print(f"copier: {copier.name}")
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    started = time.perf_counter()
    for nbytes in sizes:
        with workdir(args.dir) as root:
            rows = run_size(nbytes, device, copier, root, shm, args.repeat)
        print(f"\n## {nbytes / GiB:.3g} GiB")
        width = max(len(name) for name, _ in rows)
        for name, figure in rows:
            print(f"{name:<{width}}  {figure}")
        if cuda:
            torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - started:.1f} s; {describe_run()}")
    return 0
