"""One scenario of ``bench scale``, in a process of its own: N simulated hosts save and restore.

Run as a *script* (``python bench/scale_worker.py CONFIG.json REPORT.json``), never as
``bench.scale_worker``: the scenario for an older library runs with that checkout first
on ``PYTHONPATH``, and a script imports nothing from this repository's ``bench`` package,
so whichever ``cloudckpt`` is first on the path is the one measured. The simulated-host
group (``cloudckpt/testing/threads.py``) is loaded from this checkout by file when the
library under test predates it - it only needs the ``Coordinator`` protocol, which that
library has.

Modes (``config["mode"]``):

* ``cloudckpt``: ``hosts`` ranks of a ``ThreadGroup``, each with its own ``Mesh``, its own
  shards (``arrays`` float32 arrays sharded by rows, ``shard_bytes`` per host each), its own
  boto3 client and ``S3Storage``; ``DTensorCheckpoint.write`` then ``read`` (verified value
  for value), then a ``read`` through the io host (one index GET per job today).
* ``dcp``: the same state as ``DTensor``\\ s on torch's in-process threaded process group
  (``torch.testing._internal.distributed.multi_threaded_pg``, what torch's own tests use
  to run many ranks as threads), ``dcp.save`` with ``FsspecWriter`` over s3fs (an
  ``S3FileSystem`` of its own per rank) and ``dcp.load`` with ``FsspecReader``.

Each phase is timed between barriers (so it is the slowest host's time) and reported with
its wall-clock window, which the parent matches against the throttle's request log.
Retries are counted from the library's own log records (every retry is logged, in both the
old and the current retry layer) and, where the library has it, ``transfer_stats()``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COLS = 256  # float32 columns of every array: a host's shard is shard_bytes / 1 KiB rows


class RetryCounter(logging.Handler):
    """Counts the retry records of ``cloudckpt.storage`` (throttled and transient ones apart)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lock_ = threading.Lock()
        self.throttled = 0
        self.transient = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = str(record.msg)
        with self.lock_:
            if "throttled" in message and "retrying" in message:
                self.throttled += 1
            elif message.startswith("retrying"):
                self.transient += 1

    def snapshot(self) -> tuple[int, int]:
        with self.lock_:
            return self.throttled, self.transient


def thread_group_class() -> Any:
    try:
        from cloudckpt.testing.threads import ThreadGroup
        return ThreadGroup
    except ImportError:  # a library from before the simulated-host group: load ours by file
        spec = importlib.util.spec_from_file_location("cloudckpt_sim_threads", REPO / "cloudckpt/testing/threads.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module.ThreadGroup


def local_rows(config: dict[str, Any]) -> int:
    return max(1, int(config["shard_bytes"]) // (COLS * 4))


def local_values(rank: int, array: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng([rank, array])
    return rng.random((rows, COLS), dtype=np.float32)


def s3_client(session: Any, endpoint: str, pool: int) -> Any:
    """A boto3 client configured as cloudckpt configures its own (one per simulated host)."""
    from botocore.config import Config

    config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=pool,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    s3={"addressing_style": "path", "payload_signing_enabled": False}, user_agent_extra="cloudckpt")
    return session.client("s3", endpoint_url=endpoint, config=config)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:400]}"


def phase_report(name: str, results: list[Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One phase from every rank's result dict (``start``/``end``/``error``)."""
    done = [r for r in results if isinstance(r, dict)]
    errors = [r.get("error") for r in done if r.get("error")] + [str(r) for r in results if not isinstance(r, dict)]
    starts = [r["start"] for r in done if "start" in r]
    ends = [r["end"] for r in done if "end" in r]
    out = {"phase": name, "start": min(starts, default=0.0), "end": max(ends, default=0.0),
           "failed_ranks": len(errors), "ranks": len(results), "errors": sorted(set(errors))[:3]}
    out["seconds"] = out["end"] - out["start"] if starts and ends else None
    out.update(extra or {})
    return out


# --------------------------------------------------------------------------- cloudckpt
def run_cloudckpt(config: dict[str, Any], counter: RetryCounter) -> dict[str, Any]:
    import boto3

    import cloudckpt
    from cloudckpt import UNSHARDED, CheckpointOptions, DTensorCheckpoint, Layout, Location, Mesh, ShardedArray
    from cloudckpt.storage import TransferConfig
    from cloudckpt.storage.s3 import S3Storage

    hosts, arrays, rows = int(config["hosts"]), int(config["arrays"]), local_rows(config)
    root = f"s3://{config['bucket']}/{config['prefix']}"
    transfer = TransferConfig()
    session = boto3.session.Session()
    stores = [S3Storage(root, client=s3_client(session, config["endpoint"], transfer.max_concurrency), config=transfer)
              for _ in range(hosts)]
    has_stats = hasattr(stores[0], "transfer_stats")
    group_class = thread_group_class()

    def transfer_totals() -> dict[str, int]:
        if not has_stats:
            return {}
        stats = [s.transfer_stats() for s in stores]
        return {"requests": sum(s.requests for s in stats), "throttled": sum(s.throttled for s in stats),
                "retries": sum(s.retries for s in stats), "min_concurrency": min(s.min_concurrency for s in stats)}

    # Untimed warm-up, outside the checkpoint directory: the per-process conditional-write probe.
    cloudckpt.Checkpoint(w=np.zeros(4, np.float32)).write(Location(S3Storage(
        f"s3://{config['bucket']}/{config['prefix']}-warm", client=stores[0].client), "warm"))

    originals = [[local_values(r, a, rows) for a in range(arrays)] for r in range(hosts)]
    shape = (hosts * rows, COLS)
    io_host = CheckpointOptions(experimental_io_device="/job:worker/replica:0/task:0")

    def state(coordinator: Any, values: list[np.ndarray]) -> tuple[Any, dict[str, Any]]:
        mesh = Mesh(["x"], [hosts], coordinator=coordinator)
        layout = Layout(["x", UNSHARDED], mesh)
        return mesh, {f"a{a}": ShardedArray(shape, np.float32, layout, [values[a]]) for a in range(arrays)}

    def timed(coordinator: Any, body: Any) -> dict[str, Any]:
        coordinator.barrier()
        out: dict[str, Any] = {"start": time.time()}
        try:
            body()
        except Exception as exc:
            out["error"] = describe(exc)
        try:
            coordinator.barrier()
        except Exception as exc:
            out.setdefault("error", describe(exc))
        out["end"] = time.time()
        return out

    def save_host(coordinator: Any, into: list[Any]) -> dict[str, Any]:
        mesh, tree = state(coordinator, originals[coordinator.rank])
        ckpt = DTensorCheckpoint(mesh, **tree)
        out = timed(coordinator, lambda: ckpt.write(Location(into[coordinator.rank], "ckpt-1")))
        stats = getattr(ckpt, "last_save_stats", None)
        if coordinator.rank == 0 and stats is not None:
            out["bytes"], out["objects"] = stats.bytes, stats.objects
        return out

    def restore_host(coordinator: Any, options: Any) -> dict[str, Any]:
        dests = [np.zeros_like(v) for v in originals[coordinator.rank]]
        mesh, tree = state(coordinator, dests)
        ckpt = DTensorCheckpoint(mesh, **tree)
        out = timed(coordinator, lambda: ckpt.read(Location(stores[coordinator.rank], "ckpt-1"), options=options))
        if "error" not in out and not all(np.array_equal(d, o) for d, o in zip(dests, originals[coordinator.rank],
                                                                             strict=True)):
            out["error"] = "restored values differ from the saved ones"
        return out

    def run_phase(name: str, fn: Any) -> dict[str, Any]:
        group = group_class(hosts, timeout=float(config["group_timeout"]), copy_objects=hosts <= 64)
        before_stats, before_log = transfer_totals(), counter.snapshot()
        outcomes = group.run(fn, timeout=float(config["phase_timeout"]))
        after_stats, after_log = transfer_totals(), counter.snapshot()
        results = [o.value if o.ok else describe(o.error) for o in outcomes]
        extra: dict[str, Any] = {"retries_logged_throttled": after_log[0] - before_log[0],
                                 "retries_logged_transient": after_log[1] - before_log[1]}
        if after_stats:
            extra["client"] = {k: after_stats[k] - before_stats.get(k, 0) for k in ("requests", "throttled", "retries")}
            extra["client"]["min_concurrency"] = after_stats["min_concurrency"]
        first = results[0] if isinstance(results[0], dict) else {}
        extra.update({k: first[k] for k in ("bytes", "objects") if k in first})
        return phase_report(name, results, extra)

    def committed() -> bool:
        try:
            stores[0].head("ckpt-1.index")
            return True
        except Exception:
            return False

    phases = [run_phase("save", lambda c: save_host(c, stores))]
    phases[0]["committed"] = committed()
    if not phases[0]["committed"] and config.get("direct_endpoint"):
        # The save failed under the throttle: write the same checkpoint straight to the server
        # (not timed against the others) so that the restore under the throttle is still measured.
        direct = [S3Storage(root, client=s3_client(session, config["direct_endpoint"], transfer.max_concurrency),
                            config=transfer) for _ in range(hosts)]
        phases.append(run_phase("save, unthrottled (for the restore)", lambda c: save_host(c, direct)))
        phases[-1]["committed"] = committed()
    if phases[-1]["committed"]:
        phases.append(run_phase("restore", lambda c: restore_host(c, None)))
        phases.append(run_phase("restore via io host", lambda c: restore_host(c, io_host)))
    return {"library": cloudckpt.__file__, "phases": phases}


# --------------------------------------------------------------------------- torch DCP
def run_dcp(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.multi_threaded_pg import ProcessLocalGroup, _install_threaded_pg

    hosts, arrays, rows = int(config["hosts"]), int(config["arrays"]), local_rows(config)
    url = f"s3://{config['bucket']}/{config['prefix']}/dcp"
    fs_options = {"endpoint_url": config["endpoint"], "skip_instance_cache": True}
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    store = dist.HashStore()
    results: list[dict[str, Any]] = [{} for _ in range(hosts)]

    def host(rank: int) -> None:
        out = results[rank]
        try:
            dist.init_process_group("threaded", rank=rank, world_size=hosts, store=store)
            mesh = init_device_mesh("cpu", (hosts,), mesh_dim_names=("x",))
            originals = [torch.from_numpy(local_values(rank, a, rows)) for a in range(arrays)]

            def tree(values: list[Any]) -> dict[str, Any]:
                return {f"a{a}": DTensor.from_local(v, mesh, [Shard(0)], run_check=False,
                                                    shape=torch.Size((hosts * rows, COLS)), stride=(COLS, 1))
                        for a, v in enumerate(values)}

            dests = [torch.zeros_like(v) for v in originals]
            # Clients made and connected before the clock starts, as cloudckpt's are.
            writer = FsspecWriter(url, sync_files=False, **fs_options)
            reader = FsspecReader(url, **fs_options)
            writer.fs.fs.connect()
            reader.fs.fs.connect()

            def save() -> None:
                dcp.save(tree(originals), storage_writer=writer)

            def restore() -> None:
                dcp.load(tree(dests), storage_reader=reader)

            for name, body in (("save", save), ("restore", restore)):
                dist.barrier()
                phase: dict[str, Any] = {"start": time.time()}
                try:
                    body()
                    if name == "restore" and not all(torch.equal(d, o) for d, o in zip(dests, originals, strict=True)):
                        phase["error"] = "restored values differ from the saved ones"
                except Exception as exc:
                    phase["error"] = describe(exc)
                dist.barrier()
                phase["end"] = time.time()
                out[name] = phase
                if "error" in phase:
                    break
            dist.destroy_process_group()
        except BaseException as exc:
            out["crash"] = describe(exc) + "\n" + traceback.format_exc()[-1500:]
            ProcessLocalGroup.exception_handle(exc)  # wake the other ranks instead of leaving them waiting

    threads = [threading.Thread(target=host, args=(r,), daemon=True, name=f"dcp-rank-{r}") for r in range(hosts)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + float(config["phase_timeout"]) * 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    phases = []
    for name in ("save", "restore"):
        per_rank: list[Any] = [r.get(name) or r.get("crash") or "did not run" for r in results]
        if all(isinstance(p, str) and p == "did not run" for p in per_rank):
            continue
        phases.append(phase_report(name, per_rank, {"hung_ranks": hung}))
    if phases:
        phases[0]["committed"] = phases[0]["failed_ranks"] == 0
    import torch as _torch
    return {"library": f"torch {_torch.__version__} DCP FsspecWriter/FsspecReader", "phases": phases}


# --------------------------------------------------------------------------- the index rows
def peak_rss_mib() -> float:
    """This process's peak resident memory since its ``exec`` (``VmHWM``; ``ru_maxrss`` would
    report the parent's size at fork time when that was larger)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_index(config: dict[str, Any]) -> dict[str, Any]:
    """One phase of the index rows, alone in this process (so its peak memory is its own).

    ``write``: one process holds all ``hosts`` devices of a 1-D mesh and ``arrays`` arrays
    of one float32 per device, and writes them with ``DTensorCheckpoint.write`` - the index
    of a ``hosts``-host job (one chunk per host and array) through the real save path;
    ``read``: the library's index read (fetch + parse + validate); ``list``:
    ``list_variables``; ``restore``: ``DTensorCheckpoint.read`` into every device's shard;
    ``plan``: the save plan every host computes from ``hosts`` descriptions of ``arrays``
    pieces each, and how many bytes of descriptions every host receives for it.
    """
    import cloudckpt
    from cloudckpt import DTensorCheckpoint, Layout, Location, Mesh, ShardedArray, list_variables, open_storage
    from cloudckpt.format.index_fetch import load_index

    hosts, arrays, phase = int(config["hosts"]), int(config["arrays"]), config["phase"]
    directory, name = config["directory"], config["name"]
    storage = open_storage(directory)
    out: dict[str, Any] = {"library": cloudckpt.__file__, "phase": phase, "hosts": hosts, "arrays": arrays}

    mesh = Mesh(["x"], [hosts])  # every device in this one process

    def tree(fill: bool) -> dict[str, Any]:
        layout = Layout(["x"], mesh)
        return {f"a{a}": ShardedArray((hosts,), np.float32, layout,
                                      [np.full(1, a * hosts + d if fill else 0, np.float32) for d in range(hosts)])
                for a in range(arrays)}

    started = time.perf_counter()
    if phase == "write":
        state = tree(True)
        started = time.perf_counter()
        DTensorCheckpoint(mesh, **state).write(Location(storage, name))
        out["seconds"] = time.perf_counter() - started
        out["index_bytes"] = storage.head(f"{name}.index").size
    elif phase == "read":
        index = load_index(storage, name)
        out["seconds"] = time.perf_counter() - started
        out["chunks"] = sum(len(getattr(e, "chunks", ())) for e in index.entries.values())
    elif phase == "list":
        out["variables"] = len(list_variables(f"{directory}/{name}"))
        out["seconds"] = time.perf_counter() - started
    elif phase == "restore":
        state = tree(False)
        started = time.perf_counter()
        DTensorCheckpoint(mesh, **state).read(Location(storage, name)).expect_partial()
        out["seconds"] = time.perf_counter() - started
        wrong = [k for k, v in state.items() for d, shard in enumerate(v.local_shards)
                 if shard[0] != int(k[1:]) * hosts + d]
        if wrong:
            out["error"] = f"restored values differ in {len(wrong)} shard(s)"
    elif phase == "plan":
        # What every host computes at the start of every save: the plan from all hosts'
        # descriptions (internal API: this row follows the pipeline's own types).
        import pickle

        from cloudckpt.saving.plan import Description, PieceDescription, make_plan

        global_shape = (hosts * 1024, 1024)
        known = {f"model/layer{a}/kernel": ("float32", global_shape) for a in range(arrays)}
        descriptions = [Description(url="s3://bucket/run/ckpt-1", suffix="0123456789abcdef", max_objects=4,
                                    arrays=known,
                                    pieces=tuple(PieceDescription((f"model/layer{a}/kernel", (r * 1024, 0)),
                                                                  (1024, 1024), 4 * 1024 * 1024)
                                                 for a in range(arrays)))
                        for r in range(hosts)]
        started = time.perf_counter()
        make_plan(descriptions, committer=0, io_rank=None)
        out["seconds"] = time.perf_counter() - started
        out["gathered_mib_per_host"] = round(len(pickle.dumps(descriptions[0])) * hosts / 2**20, 1)
    else:
        raise ValueError(f"unknown index phase {phase!r}")
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    counter = RetryCounter()
    storage_log = logging.getLogger("cloudckpt.storage")
    storage_log.setLevel(logging.INFO)
    storage_log.addHandler(counter)
    storage_log.propagate = False  # counted, not printed: a retry storm would flood the output
    logging.getLogger("cloudckpt").setLevel(logging.WARNING)
    started = time.time()
    try:
        if config["mode"] == "index":
            import resource

            limit = int(config["memory_limit"])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # fail with MemoryError, not the machine
            report = run_index(config)
        elif config["mode"] == "dcp":
            report = run_dcp(config)
        else:
            report = run_cloudckpt(config, counter)
    except Exception as exc:
        report = {"crash": describe(exc), "traceback": traceback.format_exc()[-3000:], "phases": []}
    report["wall"] = time.time() - started
    Path(argv[1]).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
