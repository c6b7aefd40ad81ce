"""JAX benchmark: ``cloudckpt.jax`` against Orbax's ``StandardCheckpointer`` on the same pytree.

One run, one process with ``--devices`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``,
set before jax is imported), measures on the same state - a transformer's parameters plus its
Adam moments (``mu``, ``nu``: the same shapes) and step counters, ``--size-mib`` in all, float32,
every matrix sharded over a (devices/2, 2) mesh ``("fsdp", "model")``, vectors replicated:

1. **Save and restore** on local disk: Orbax ``StandardCheckpointer`` (its default: OCDBT +
   zarr through tensorstore; ``save`` + ``wait_until_finished``) vs ``ccjax.save`` (sync);
   restore into the same shardings (``jax.ShapeDtypeStruct(..., sharding=...)``) vs
   ``ccjax.restore``. Each path runs ``--repeat`` times interleaved with the other; the best
   counts. Every restore is compared leaf by leaf with the state (untimed).
2. **S3** (SeaweedFS on 127.0.0.1), where Orbax cannot go (its path layer has no ``s3://``):
   ``ccjax`` save and restore, against its own local-disk times.
3. **Async**: the caller-blocked time of Orbax's async save (``StandardCheckpointer.save`` returns
   after the device-to-host copy) vs a ``ccjax.PyTreeCheckpoint`` write with
   ``CheckpointOptions(enable_async=True)``, and the time to done (``wait_until_finished`` /
   ``sync``); the first save of each is reported apart (it allocates and warms up).
4. **2 processes x 2 CPU devices** (``jax.distributed.initialize`` on 127.0.0.1, gloo collectives), the
   same shapes on a (2, 2) mesh, each process building only its own shards: save / restore of both
   paths on local disk, timed by process 0 between two global barriers, every shard checked.
5. **Peak extra host memory**, in a fresh process per path: the high-water mark of RSS during one
   save (reset just before it) minus RSS before it, as a share of the state's bytes; for a
   restore, minus the restored state itself (which the restore must allocate).

Not measured here: Orbax on GCS - Orbax reaches ``gs://`` through etils' path layer, which needs
gcsfs (or TensorFlow), in neither environment of this repository, and fake-gcs-server is not in
the bench environment. Ratios are Orbax's time over cloudckpt's (above 1: cloudckpt is faster)
and cloudckpt's memory over Orbax's. The load average is printed at the start and at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_checkpoint import _proc_status_kib, _reset_peak_rss, describe_run, s3_server, use_bench_credentials
from bench.ckpt_paths import s3_client, s3_delete_prefix

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
#: Bounded wait for one memory-measuring subprocess (imports jax, builds the state, saves once).
CHILD_TIMEOUT = 900.0
PATHS = ("orbax", "ccjax")


def force_devices(count: int) -> None:
    """Make jax see ``count`` CPU devices: must run before jax is imported (why the imports below are late)."""
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the CPU device count could be set")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# --------------------------------------------------------------------------- the state
def shapes(total_bytes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a decoder-only transformer whose params + Adam moments are ~``total_bytes``."""
    width = 1024 if total_bytes >= 512 * MiB else 256
    vocab = 16 * width
    per_layer = 12 * width * width * 4  # wq wk wv wo (d x d) + w1 (d x 4d) + w2 (4d x d), float32
    layers = max(1, round((total_bytes / 3 - vocab * width * 4) / per_layer))
    out: dict[str, tuple[int, ...]] = {"embed": (vocab, width), "final_norm": (width,)}
    for i in range(layers):
        for name in ("wq", "wk", "wv", "wo"):
            out[f"layer_{i}/attn/{name}"] = (width, width)
        out[f"layer_{i}/mlp/w1"] = (width, 4 * width)
        out[f"layer_{i}/mlp/w2"] = (4 * width, width)
        out[f"layer_{i}/norm1"] = (width,)
        out[f"layer_{i}/norm2"] = (width,)
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def make_tree(total_bytes: int, seed: int = 0, *, like_only: bool = False) -> dict[str, Any]:
    """``{"step", "params", "opt_state": {"count", "mu", "nu"}}`` of sharded jax.Arrays on a (n/2, 2) mesh
    (``like_only``: the same as ``jax.ShapeDtypeStruct`` leaves, no data - a restore target)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(len(devices) // 2, 2), ("fsdp", "model"))
    rng = np.random.default_rng(seed)

    def array(shape: tuple[int, ...], scale: float = 1.0, dtype: Any = np.float32, positive: bool = False) -> Any:
        sharding = NamedSharding(mesh, PartitionSpec("fsdp", "model") if len(shape) == 2 else PartitionSpec())
        if like_only:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        if not shape:
            return jax.device_put(np.asarray(100, dtype), sharding)
        host = rng.standard_normal(shape, dtype) * dtype(scale)  # random: compresses as trained state does
        return jax.device_put(np.abs(host) if positive else host, sharding)

    layout = shapes(total_bytes)
    return {
        "step": array((), dtype=np.int32),
        "params": _nest({k: array(s) for k, s in layout.items()}),
        "opt_state": {"count": array((), dtype=np.int32),
                      "mu": _nest({k: array(s, 0.1) for k, s in layout.items()}),
                      "nu": _nest({k: array(s, 1e-3, positive=True) for k, s in layout.items()})},
    }


def tree_bytes(tree: Any) -> int:
    import jax

    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def abstract(tree: Any) -> Any:
    """The restore target: shapes, dtypes and shardings of ``tree``, no data."""
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def verify(restored: Any, tree: Any, label: str) -> None:
    """Every leaf equal in value, dtype and sharding (untimed)."""
    import jax

    got, want = jax.tree.leaves(restored), jax.tree.leaves(tree)
    if len(got) != len(want):
        raise AssertionError(f"{label}: {len(got)} leaves restored, {len(want)} saved")
    for g, w in zip(got, want, strict=True):
        if g.dtype != w.dtype or g.shape != w.shape or not g.sharding.is_equivalent_to(w.sharding, w.ndim):
            raise AssertionError(f"{label}: restored {g.dtype}{g.shape} {g.sharding}, saved {w.dtype}{w.shape}")
        if not np.array_equal(np.asarray(g), np.asarray(w)):
            raise AssertionError(f"{label}: a {w.shape} leaf restored different values")


# --------------------------------------------------------------------------- the two paths
def saver(path: str) -> tuple[Callable[[Any, str], None], Callable[[Any, str], Any]]:
    """``(save(tree, location), restore(like, location))`` of ``path``; locations are directories / URLs."""
    import jax

    if path == "orbax":
        import orbax.checkpoint as ocp

        ckptr = ocp.StandardCheckpointer()

        def orbax_save(tree: Any, where: str) -> None:
            ckptr.save(where, tree)
            ckptr.wait_until_finished()

        def orbax_restore(like: Any, where: str) -> Any:
            return jax.block_until_ready(ckptr.restore(where, like))
        return orbax_save, orbax_restore
    import cloudckpt.jax as ccjax

    def ccjax_save(tree: Any, where: str) -> None:
        ccjax.save(where, tree)

    def ccjax_restore(like: Any, where: str) -> Any:
        return jax.block_until_ready(ccjax.restore(where, like))
    return ccjax_save, ccjax_restore


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def measure_round_robin(tree: Any, paths: list[str], where: Callable[[str, int], str], repeat: int,
                        clear: Callable[[str, int], None], target: str) -> dict[str, dict[str, list[float]]]:
    """Save each path ``repeat`` times interleaved, then restore interleaved, verifying each restore."""
    fns = {p: saver(p) for p in paths}
    like = abstract(tree)
    warm = make_tree(4 * MiB, seed=3)
    for p in paths:  # untimed: the first call of a path imports, builds clients and thread pools
        fns[p][0](warm, where(p, -1))
        fns[p][1](abstract(warm), where(p, -1))
        clear(p, -1)
    times: dict[str, dict[str, list[float]]] = {p: {"save": [], "restore": []} for p in paths}
    for i in range(repeat):
        for p in paths:
            if i > 0:
                clear(p, i - 1)
            seconds, _ = timed(lambda p=p, i=i: fns[p][0](tree, where(p, i)))
            times[p]["save"].append(seconds)
            print(f"  {target} save    {p}: {seconds:.2f} s", flush=True)
    for _ in range(repeat):
        for p in paths:
            seconds, restored = timed(lambda p=p: fns[p][1](like, where(p, repeat - 1)))
            verify(restored, tree, f"{target} {p}")
            del restored
            times[p]["restore"].append(seconds)
            print(f"  {target} restore {p}: {seconds:.2f} s (verified)", flush=True)
    for p in paths:
        clear(p, repeat - 1)
    return times


def measure_async(tree: Any, root: Path, repeat: int) -> dict[str, dict[str, float]]:
    """Caller-blocked and total seconds of async saves: Orbax's async StandardCheckpointer vs ccjax's."""
    import jax
    import orbax.checkpoint as ocp

    import cloudckpt
    import cloudckpt.jax as ccjax

    def host_copy_of_tree() -> list[Any]:
        return [np.array(leaf, copy=True) for leaf in jax.tree.leaves(tree)]

    host_copy = min(timed(host_copy_of_tree)[0] for _ in range(max(1, repeat)))
    ckptr = ocp.StandardCheckpointer()
    ckpt = ccjax.PyTreeCheckpoint(tree)
    options = cloudckpt.CheckpointOptions(enable_async=True)
    runs: dict[str, list[tuple[float, float]]] = {"orbax": [], "ccjax": []}
    try:
        for i in range(repeat + 1):
            for p in PATHS:
                where = root / f"async-{p}-{i}"
                gc.collect()
                started = time.perf_counter()
                if p == "orbax":
                    ckptr.save(where, tree)
                else:
                    ckpt.write(str(where / "ckpt"), options=options)
                blocked = time.perf_counter() - started
                ckptr.wait_until_finished() if p == "orbax" else ckpt.sync()
                total = time.perf_counter() - started
                runs[p].append((blocked, total))
                print(f"  async {p} {i}: blocked {blocked:.3f} s, done after {total:.2f} s", flush=True)
                shutil.rmtree(where, ignore_errors=True)
    finally:
        ckpt.close()
    out = {p: {"blocked_first": r[0][0], "blocked_best": min(b for b, _ in r[1:]),
               "total_best": min(t for _, t in r[1:])} for p, r in runs.items()}
    out["device_get"] = {"blocked_first": host_copy, "blocked_best": host_copy, "total_best": host_copy}
    return out


# --------------------------------------------------------------------------- memory (subprocess)
def memory_child(spec_json: str) -> int:
    """Subprocess entry: warm the path up on a tiny tree, then measure one save (of a state built here)
    or one restore (of the checkpoint the save child left, in a process that never held the state)."""
    spec = json.loads(spec_json)
    force_devices(spec["devices"])
    save, restore = saver(spec["path"])
    warm = make_tree(4 * MiB, seed=2)
    save(warm, f"{spec['root']}/warm-{spec['op']}")
    restore(abstract(warm), f"{spec['root']}/warm-{spec['op']}")
    del warm
    where = f"{spec['root']}/measured"
    tree = make_tree(spec["size"], seed=1, like_only=spec["op"] == "restore")
    size = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in _leaves(tree))
    gc.collect()
    before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    started = time.perf_counter()
    if spec["op"] == "save":
        save(tree, where)
    else:
        restored = restore(tree, where)
    seconds = time.perf_counter() - started
    peak = _proc_status_kib("VmHWM")
    extra = (peak - before) * 1024 - (size if spec["op"] == "restore" else 0)  # a restore must hold the state
    if spec["op"] == "restore":
        verify(restored, make_tree(spec["size"], seed=1), f"memory {spec['path']} restore")
    print(json.dumps({"extra": extra, "state_bytes": size, "reset": reset, "seconds": seconds}))
    return 0


def _leaves(tree: Any) -> list[Any]:
    import jax

    return list(jax.tree.leaves(tree))


def measure_memory(path: str, op: str, size: int, devices: int, root: Path) -> dict[str, Any]:
    """Run ``memory_child`` in a fresh interpreter (bounded wait) and parse its one JSON line.

    ``save`` leaves its checkpoint in ``root/mem-<path>`` for the ``restore`` that follows (which removes it).
    """
    work = root / f"mem-{path}"
    work.mkdir(exist_ok=True)
    spec = json.dumps({"path": path, "op": op, "size": size, "devices": devices, "root": str(work)})
    code = "import sys; from bench.bench_jax import memory_child; sys.exit(memory_child(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, spec], cwd=REPO, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, check=False)
    if op == "restore" or proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {path} {op} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  memory {op} {path}: +{out['extra'] / MiB:.0f} MiB "
          f"({100 * out['extra'] / out['state_bytes']:.1f} % of the state)", flush=True)
    return out


# --------------------------------------------------------------------------- 2 processes x 2 devices
def _global_block(shape: tuple[int, ...], index: tuple[slice, ...], salt: int) -> Any:
    """The values at ``index`` of a global array of ``shape``: a function of the global position, so each
    process builds only its own shards (no process holds a global array) and a restore checks them.

    Why a hash and not a ramp: Orbax zstd-compresses its chunks, and a ramp compresses as trained
    weights do not; hashed bits are as incompressible as the 1-process run's random normals.
    """
    if not shape:
        return np.float32(salt)
    grids = np.ix_(*[np.arange(*sl.indices(n), dtype=np.uint64) for sl, n in zip(index, shape, strict=True)])
    flat = grids[0] * np.uint64(shape[1]) + grids[1] if len(shape) == 2 else grids[0]
    hashed = (flat * np.uint64(2654435761) + np.uint64(salt * 40503)) & np.uint64(0xFFFFFFFF)
    return ((hashed >> np.uint64(8)).astype(np.float32) / np.float32(1 << 24) - np.float32(0.5)).astype(np.float32)


def _flat_items(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _flat_items(v, f"{prefix}{k}/")]
    return [(prefix.rstrip("/"), tree)]


def mp_child(spec_json: str) -> int:
    """One of 2 processes x 2 CPU devices on JAX's distributed runtime: interleaved saves, then restores,
    of each path, a barrier before and after each timed call; process 0 prints the timings as JSON."""
    spec = json.loads(spec_json)
    force_devices(2)
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{spec['port']}", num_processes=2,
                               process_id=spec["rank"], initialization_timeout=120)
    mesh = jax.make_mesh((2, 2), ("fsdp", "model"))
    layout = sorted((f"{part}/{k}", s) for part in ("params", "mu", "nu") for k, s in shapes(spec["size"]).items())

    def sharding(shape: tuple[int, ...]) -> Any:
        return NamedSharding(mesh, PartitionSpec("fsdp", "model") if len(shape) == 2 else PartitionSpec())

    tree = _nest({k: jax.make_array_from_callback(s, sharding(s), lambda i, s=s, n=n: _global_block(s, i, n % 7))
                  for n, (k, s) in enumerate(layout)})
    like = abstract(tree)
    fns = {p: saver(p) for p in spec["paths"]}
    times: dict[str, dict[str, list[float]]] = {p: {"save": [], "restore": []} for p in spec["paths"]}

    def collective(name: str, fn: Callable[[], Any]) -> tuple[float, Any]:
        multihost_utils.sync_global_devices(f"before {name}")
        started = time.perf_counter()
        out = fn()
        multihost_utils.sync_global_devices(f"after {name}")
        return time.perf_counter() - started, out

    last = spec["repeat"] - 1
    for i in range(spec["repeat"]):
        for p in spec["paths"]:
            where = f"{spec['root']}/{p}-{i}/ckpt"
            seconds, _ = collective(f"save {p} {i}", lambda p=p, where=where: fns[p][0](tree, where))
            times[p]["save"].append(seconds)
    for i in range(spec["repeat"]):
        for p in spec["paths"]:
            where = f"{spec['root']}/{p}-{last}/ckpt"
            seconds, restored = collective(f"restore {p} {i}", lambda p=p, where=where: fns[p][1](like, where))
            got = dict(_flat_items(restored))
            for n, (key, shape) in enumerate(layout):
                for shard in got[key].addressable_shards:
                    if not np.array_equal(np.asarray(shard.data), _global_block(shape, shard.index, n % 7)):
                        raise AssertionError(f"2 processes, {p}: {key} restored different values")
            del restored, got
            times[p]["restore"].append(seconds)
    if spec["rank"] == 0:
        print(json.dumps(times), flush=True)
    multihost_utils.sync_global_devices("done")
    return 0


def measure_two_processes(size: int, repeat: int, root: Path) -> dict[str, dict[str, list[float]]]:
    """Spawn 2 processes x 2 CPU devices (bounded wait, killed by PID on timeout); process 0's timings."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = "import sys; from bench.bench_jax import mp_child; sys.exit(mp_child(sys.argv[1]))"
    procs = []
    for rank in range(2):
        spec = json.dumps({"rank": rank, "port": port, "root": str(root / "mp"), "size": size, "repeat": repeat,
                           "paths": list(PATHS)})
        procs.append(subprocess.Popen([sys.executable, "-c", code, spec], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=CHILD_TIMEOUT))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    for proc, (_, err) in zip(procs, outs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"2-process child failed ({proc.returncode}):\n{err[-3000:]}")
    times: dict[str, dict[str, list[float]]] = json.loads(outs[0][0].strip().splitlines()[-1])
    for p, by_op in times.items():
        for op, values in by_op.items():
            print(f"  2x2 {op} {p}: {', '.join(f'{v:.2f}' for v in values)} s", flush=True)
    shutil.rmtree(root / "mp", ignore_errors=True)
    return times


# --------------------------------------------------------------------------- report
def ratio(theirs: float, ours: float) -> str:
    """``theirs / ours``; a peak at or below the baseline (memory reused, or noise) has no ratio."""
    return f"{theirs / ours:.2f}x" if ours > 0 and theirs > 0 else "n/a (one side at or below 0)"


def report(size: int, times: dict[str, dict[str, dict[str, list[float]]]], asyncs: dict[str, dict[str, float]],
           memory: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The markdown tables docs/benchmarks.md records."""
    gib = size / (1024 * MiB)
    lines = [f"State: {size / MiB:.0f} MiB (params + Adam mu/nu, float32, sharded on the mesh).", ""]
    if times:
        lines += ["| store | op | Orbax StandardCheckpointer | cloudckpt.jax | Orbax ÷ ccjax |",
                  "|---|---|---|---|---|"]
        for target, by_path in times.items():
            for op in ("save", "restore"):
                ours = min(by_path["ccjax"][op])
                if "orbax" in by_path:
                    theirs = min(by_path["orbax"][op])
                    lines.append(f"| {target} | {op} | {theirs:.2f} s ({gib / theirs:.2f} GiB/s) | {ours:.2f} s "
                                 f"({gib / ours:.2f} GiB/s) | {ratio(theirs, ours)} |")
                else:
                    lines.append(f"| {target} | {op} | (cannot: no s3:// in Orbax) | {ours:.2f} s "
                                 f"({gib / ours:.2f} GiB/s) | - |")
        lines.append("")
    if asyncs:
        o, c, d = asyncs["orbax"], asyncs["ccjax"], asyncs["device_get"]
        lines += ["| async save, local disk | Orbax (async StandardCheckpointer) | cloudckpt.jax (enable_async) | "
                  "Orbax ÷ ccjax |", "|---|---|---|---|",
                  f"| caller blocked, first save | {o['blocked_first']:.3f} s | {c['blocked_first']:.3f} s | "
                  f"{ratio(o['blocked_first'], c['blocked_first'])} |",
                  f"| caller blocked, later saves (best) | {o['blocked_best']:.3f} s | {c['blocked_best']:.3f} s | "
                  f"{ratio(o['blocked_best'], c['blocked_best'])} |",
                  f"| until done (best) | {o['total_best']:.2f} s | {c['total_best']:.2f} s | "
                  f"{ratio(o['total_best'], c['total_best'])} |",
                  f"| (one copy of the tree into new host arrays, for scale) | {d['blocked_best']:.3f} s | | |", ""]
    if memory:
        lines += ["| peak extra host memory | Orbax | cloudckpt.jax | ccjax ÷ Orbax |", "|---|---|---|---|"]
        for op in ("save", "restore"):
            if (op, "orbax") in memory and (op, "ccjax") in memory:
                o_mem, c_mem = memory[(op, "orbax")], memory[(op, "ccjax")]
                share = [100 * m["extra"] / m["state_bytes"] for m in (o_mem, c_mem)]
                lines.append(f"| {op} | {o_mem['extra'] / MiB:.0f} MiB ({share[0]:.0f} %) | {c_mem['extra'] / MiB:.0f} "
                             f"MiB ({share[1]:.0f} %) | {ratio(c_mem['extra'], o_mem['extra'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="state size (default 1024 = 1 GiB)")
    parser.add_argument("--size", type=int, dest="size_mib", help="alias of --size-mib")
    parser.add_argument("--repeat", type=int, default=2, help="runs per path; the best counts (default 2)")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices of the one process (default 8)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: local, s3, async, memory, processes")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.devices < 2 or args.devices % 2:
        parser.error("--repeat must be >= 1 and --devices an even number >= 2")
    skip = set(args.skip.split(",")) - {""}
    force_devices(args.devices)
    use_bench_credentials()
    started_as = describe_run()
    print(started_as, flush=True)
    import jax

    print(f"jax {jax.__version__}, {len(jax.devices())} devices; building {args.size_mib} MiB of state ...", flush=True)
    tree = make_tree(args.size_mib * MiB)
    size = tree_bytes(tree)
    print(f"  {len(jax.tree.leaves(tree))} arrays, {size / MiB:.1f} MiB", flush=True)
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    two: dict[str, dict[str, list[float]]] = {}
    asyncs: dict[str, dict[str, float]] = {}
    memory: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-jax-", dir=REPO) as tmp:
        root = Path(tmp)
        if "local" not in skip:
            print("local disk: save / restore ...", flush=True)
            times["local"] = measure_round_robin(
                tree, list(PATHS), lambda p, i: str(root / f"{p}-{i}" / "ckpt"), args.repeat,
                lambda p, i: shutil.rmtree(root / f"{p}-{i}", ignore_errors=True), "local")
        if "s3" not in skip:
            with s3_server(root) as endpoint:
                os.environ["AWS_ENDPOINT_URL"] = endpoint
                bucket = f"bench-{uuid.uuid4().hex[:10]}"
                client = s3_client(endpoint)
                client.create_bucket(Bucket=bucket)
                print(f"S3 (SeaweedFS at {endpoint}): ccjax save / restore ...", flush=True)
                times["s3"] = measure_round_robin(
                    tree, ["ccjax"], lambda p, i: f"s3://{bucket}/{p}-{i}/ckpt", args.repeat,
                    lambda p, i: s3_delete_prefix(client, bucket, f"{p}-{i}/"), "s3")
        if "async" not in skip:
            print("local disk: async save ...", flush=True)
            asyncs = measure_async(tree, root, args.repeat)
        if "processes" not in skip:
            print("local disk: 2 processes x 2 CPU devices (jax.distributed, gloo) ...", flush=True)
            two = measure_two_processes(args.size_mib * MiB, args.repeat, root)
        if "memory" not in skip:
            del tree
            gc.collect()
            print("local disk: peak extra memory (fresh subprocess each) ...", flush=True)
            for p in PATHS:
                for op in ("save", "restore"):
                    memory[(op, p)] = measure_memory(p, op, args.size_mib * MiB, args.devices, root)
    print()
    print(f"start: {started_as}")
    print(f"end:   {describe_run()}")
    print(f"1 process x {args.devices} CPU devices unless a row says otherwise; best of {args.repeat}")
    if two:
        times = {("local, 1 process x 8 devices" if k == "local" else k): v for k, v in times.items()}
        times["local, 2 processes x 2 devices"] = two
    print(report(size, times, asyncs, memory))
    return 0
