"""DCP benchmark: ``dcp.save`` / ``dcp.load`` through cloudckpt's writer/reader against the other DCP storages.

One SeaweedFS (``weed mini`` on 127.0.0.1, stopped by its PID) serves every run. For each
world size (default 1 and 2) a real gloo group is spawned; every rank holds its shards of
the state ``bench distributed`` uses (``--size-mib`` of float32: 12 matrices sharded by rows
as ``DTensor`` ``[Shard(0)]``, 4 replicated plain tensors). Paths, all through
``torch.distributed.checkpoint`` except the last:

- cloudckpt: ``cloudckpt.dcp.StorageWriter`` / ``StorageReader``;
- s3torchconnector: ``S3StorageWriter`` / ``S3StorageReader`` (AWS's CRT client, endpoint
  from ``AWS_ENDPOINT_URL``, ``S3ClientConfig(force_path_style=True)``), ``--peer-threads``
  writer threads;
- fsspec: ``FsspecWriter`` / ``FsspecReader`` over s3fs, ``--peer-threads`` writer threads;
- cloudckpt's own ``DTensorCheckpoint.write`` / ``read`` (no DCP), for reference.

And the TorchTitan rows (a table of their own, the ratio between the two): TorchTitan 0.2.2's
``CheckpointManager`` driving a model whose parameters are the same shards (``DTensor``s) plus
its Adam state (one step taken: 3x the state size) and LR scheduler, ``save(step)`` and a load of
that step, through ``cloudckpt.dcp.torchtitan.CloudCheckpointManager`` vs TorchTitan's own
(``checkpoint_id`` only: torch's ``FsspecWriter`` / ``FsspecReader`` over s3fs, default threads).
TorchTitan's own ``load()`` checks ``os.path`` and cannot find an ``s3://`` folder, so its restore
is timed through its ``dcp_load`` on the step's id; cloudckpt's through ``load(step)``.

Each is timed with barriers around it (the slowest rank's time counts) for save, restore
onto the same layout, and - in the world-2 run - restore of what the world-1 run saved
(onto another world size). Every restore is checked value for value (untimed). Peak
extra memory per rank is the highest resident set size a sampler thread (every 2 ms,
``/proc/self/statm``) saw during the operation minus the size when it started, the largest
over ranks and runs. Paths run ``--repeat`` times, interleaved; the best time counts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_checkpoint import describe_run
from bench.bench_distributed import (
    RankState,
    local_block,
    make_local,
    parse_worlds,
    seaweedfs_bucket,
    state_specs,
    world_parser,
)
from cloudckpt.testing.processes import spawn_reports

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The highest resident set size of this process while ``with`` runs, sampled every 2 ms."""

    def __init__(self) -> None:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def worker(rank: int, world: int, port: int, config: dict[str, Any], report: dict[str, Any]) -> None:
    """Spawned ``world`` times: every path in one gloo group; rank 0's report is the parent's."""
    report.update(_worker(rank, world, port, config))


def _worker(rank: int, world: int, port: int, config: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from cloudckpt import DTensorCheckpoint
    from cloudckpt.dcp import StorageReader, StorageWriter

    ranks = RankState(rank, world, port, config["size_bytes"])
    mesh, specs, originals, dests = ranks.mesh, ranks.specs, ranks.originals, ranks.dests
    ours_state, dcp_state = ranks.ours_state, ranks.dcp_state
    endpoint: str = config["endpoint"]
    bucket: str = config["bucket"]
    threads: int = config["peer_threads"]
    save_dcp, restore_dcp = dcp_state(originals), dcp_state(dests)

    paths: list[tuple[str, str, Callable[[str], Any], Callable[[str], Any]]] = [
        ("cloudckpt StorageWriter / StorageReader", "cloudckpt",
         lambda url: dcp.save(save_dcp, storage_writer=StorageWriter(url, overwrite=True)),
         lambda url: dcp.load(restore_dcp, storage_reader=StorageReader(url)))]
    skipped: list[str] = []
    try:
        from s3torchconnector import S3ClientConfig
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
        config_s3 = S3ClientConfig(force_path_style=True)
        paths.append((f"s3torchconnector S3StorageWriter / S3StorageReader ({threads} writer threads)", "s3tc",
                      lambda url: dcp.save(save_dcp, storage_writer=S3StorageWriter(
                          "us-east-1", url, s3client_config=config_s3, thread_count=threads)),
                      lambda url: dcp.load(restore_dcp, storage_reader=S3StorageReader(
                          "us-east-1", url, s3client_config=config_s3))))
    except ImportError as exc:
        skipped.append(f"s3torchconnector: not installed ({exc}); run through ./run bench dcp")
    paths.append((f"FsspecWriter / FsspecReader over s3fs ({threads} writer threads)", "fsspec",
                  lambda url: dcp.save(save_dcp, storage_writer=FsspecWriter(
                      url, sync_files=False, thread_count=threads, endpoint_url=endpoint)),
                  lambda url: dcp.load(restore_dcp, storage_reader=FsspecReader(url, endpoint_url=endpoint))))
    paths.append(("cloudckpt DTensorCheckpoint.write / read (no DCP)", "native",
                  lambda url: DTensorCheckpoint(mesh, **ours_state(originals)).write(url),
                  lambda url: DTensorCheckpoint(mesh, **ours_state(dests)).read(url).expect_partial()))

    def url_of(w: int, r: int, tag: str) -> str:
        base = f"s3://{bucket}/w{w}/r{r}/{tag}"
        return f"{base}/ckpt" if tag in ("cloudckpt", "native") else base

    # Untimed warm-up: clients, sessions, cloudckpt's conditional-write probe.
    for _, tag, save, _ in paths:
        save(f"s3://{bucket}/warm/w{world}/{tag}" + ("/ckpt" if tag in ("cloudckpt", "native") else ""))
    dist.barrier()

    titan = _titan_paths(ranks, bucket) if config["titan"] else []
    for _, tag, save, _, _, _ in titan:
        save(f"s3://{bucket}/warm/w{world}/{tag}")
    results: dict[str, dict[str, Any]] = {}

    def timed(key: str, label: str, direction: str, fn: Callable[[], Any], group: str = "dcp") -> None:
        dist.barrier()
        started = time.perf_counter()
        with PeakRss() as rss:
            fn()
        dist.barrier()
        elapsed = time.perf_counter() - started
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (elapsed, rss.extra))
        row = results.setdefault(key, {"direction": direction, "path": label, "seconds": [], "extra": 0,
                                       "group": group})
        row["seconds"].append(max(g[0] for g in gathered))
        row["extra"] = max(row["extra"], *(g[1] for g in gathered))

    def verify(expected: Callable[[str], np.ndarray]) -> None:
        ok = all(np.array_equal(dests[s.name], expected(s.name)) for s in specs)
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, ok)
        if not all(flags):
            raise AssertionError(f"world {world}: restored values differ from the saved ones")

    def other_world_values(name: str) -> np.ndarray:
        """What the world-1 run saved, in this rank's box."""
        spec = next(s for s in specs if s.name == name)
        first, rows = local_block(spec, rank, world)
        return make_local(spec, 0, 1, seed=0)[first:first + rows]

    for r in range(config["repeat"]):
        for label, tag, save, _ in paths:
            url = url_of(world, r, tag)
            timed(f"save|{tag}", label, "save", lambda save=save, url=url: save(url))
        for label, tag, _, load in paths:
            for array in dests.values():
                array.fill(0)
            url = url_of(world, r, tag)
            timed(f"restore|{tag}", label, "restore", lambda load=load, url=url: load(url))
            verify(lambda name: originals[name])
        for label, tag, titan_save, titan_load, zero, check in titan:
            url = f"s3://{bucket}/w{world}/r{r}/{tag}"
            timed(f"save|{tag}", label, "save", lambda fn=titan_save, url=url: fn(url), "titan")
            zero()
            timed(f"restore|{tag}", label, "restore", lambda fn=titan_load, url=url: fn(url), "titan")
            check(url)
        if world > 1 and config["other_world"]:
            for label, tag, _, load in paths:
                for array in dests.values():
                    array.fill(0)
                timed(f"reshard|{tag}", label, "restore saved by 1 process",
                      lambda load=load, tag=tag: load(url_of(1, config["repeat"] - 1, tag)))
                verify(other_world_values)
        if rank == 0:
            print(f"  world {world}: run {r + 1}/{config['repeat']} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return {"world": world, "global_bytes": ranks.global_bytes, "results": list(results.values()), "skipped": skipped}


def _titan_paths(ranks: RankState, bucket: str) -> list[tuple[str, str, Callable[[str], Any], Callable[[str], Any],
                                                              Callable[[], None], Callable[[str], None]]]:
    """TorchTitan's CheckpointManager over a model of this rank's shards: through cloudckpt, and its own.

    Each path: label, tag, save(url), load(url), and - untimed - zero the model, check the restore.
    """
    import torch
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.config import Checkpoint as CheckpointConfig

    from cloudckpt.dcp.torchtitan import CloudCheckpointManager

    model = torch.nn.Module()
    for i, tensor in enumerate(ranks.dcp_state({k: v.copy() for k, v in ranks.originals.items()}).values()):
        model.register_parameter(f"p{i}", torch.nn.Parameter(tensor))
    optimizers = OptimizersContainer([model], torch.optim.Adam, {"lr": 1e-3})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizers.step()  # Adam's moments exist: the state TorchTitan saves is 3x the parameters
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def manager(cls: Any) -> Any:
        config = CheckpointConfig(enable=True, folder=f"s3://{bucket}/titan-unused", interval=1)
        return cls(dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
                   states={}, checkpoint_config=config, sd_adapter=None)

    ours, theirs = manager(CloudCheckpointManager), manager(CheckpointManager)

    def save(m: Any) -> Callable[[str], Any]:
        def run(url: str) -> None:
            m.folder = url
            m.save(curr_step=1)
        return run

    def zero() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    def check(url: str) -> None:
        if not all(torch.equal(v, expected[k]) for k, v in model.state_dict().items()):
            raise AssertionError(f"{url}: TorchTitan restored other values")

    def load_ours(url: str) -> None:
        ours.folder = url
        if not ours.load(step=1):
            raise AssertionError(f"{url}: nothing loaded")

    def load_theirs(url: str) -> None:
        theirs.dcp_load(theirs._states_to_load(model_only=False), checkpoint_id=f"{url}/step-1", from_hf=False,
                        from_quantized=False)

    return [("cloudckpt: TorchTitan CloudCheckpointManager", "titan-cloudckpt", save(ours), load_ours, zero, check),
            ("TorchTitan CheckpointManager (torch FsspecWriter / FsspecReader, s3fs)", "titan-fsspec", save(theirs),
             load_theirs, zero, check)]


def report(worlds: list[dict[str, Any]], group: str = "dcp") -> str:
    """The markdown table: time, throughput, ratio to the best DCP peer, peak extra memory per rank.

    ``group``: ``dcp`` (the storages under ``dcp.save``) or ``titan`` (TorchTitan's manager; its
    rows' MiB/s count the model's state alone, though Adam's moments are saved too).
    """
    lines = ["| processes | direction | path | best s | MiB/s | vs best DCP peer | peak extra MiB / rank |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for w in worlds:
        size = w["global_bytes"]
        by_direction: dict[str, list[dict[str, Any]]] = {}
        for row in w["results"]:
            if row.get("group", "dcp") != group:
                continue
            row["best"] = min(row["seconds"])
            row["mib_s"] = size / MiB / row["best"]
            by_direction.setdefault(row["direction"], []).append(row)
        for direction, rows in by_direction.items():
            peers = [r["mib_s"] for r in rows if not r["path"].startswith("cloudckpt")]
            best_peer = max(peers, default=float("nan"))
            for r in rows:
                ratio = f"{r['mib_s'] / best_peer:.2f}x" if r["path"].startswith("cloudckpt") else ""
                lines.append(f"| {w['world']} | {direction} | {r['path']} | {r['best']:.2f} | {r['mib_s']:.0f} | "
                             f"{ratio} | {r['extra'] / MiB:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = world_parser("python -m bench dcp", __doc__, size_mib=1024, timeout=3600.0)
    parser.add_argument("--no-titan", action="store_true", help="leave out the TorchTitan rows")
    parser.add_argument("--peer-threads", type=int, default=4,
                        help="writer threads of s3torchconnector and FsspecWriter (cloudckpt uploads with 4)")
    args = parser.parse_args(argv)
    size_mib = 64 if args.quick else args.size_mib
    repeat = 1 if args.quick else args.repeat  # a smoke run: one run of each path
    worlds = parse_worlds(parser, args.worlds)

    import torch

    print(describe_run(), flush=True)
    results = []
    with seaweedfs_bucket("dcp") as (endpoint, bucket):
        for world in sorted(worlds):
            config = {"endpoint": endpoint, "bucket": bucket, "size_bytes": size_mib * MiB, "repeat": repeat,
                      "peer_threads": args.peer_threads, "other_world": 1 in worlds,
                      "titan": not args.no_titan}
            print(f"world {world}: spawning {world} gloo process(es) ...", flush=True)
            started = time.monotonic()
            results.append(spawn_reports(worker, world, config, timeout=args.timeout)[0])
            print(f"world {world}: done in {time.monotonic() - started:.0f} s", flush=True)
    specs = state_specs(size_mib * MiB)
    print()
    print(f"{sum(s.nbytes for s in specs) / MiB:.0f} MiB float32, best of {repeat}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, SeaweedFS on 127.0.0.1")
    for note in sorted({n for w in results for n in w["skipped"]}):
        print(f"skipped: {note}")
    print(report(results))
    if not args.no_titan:
        print("\nTorchTitan CheckpointManager (model + Adam state + LR scheduler; MiB/s of the model state):")
        print(report(results, "titan"))
    print(f"{describe_run()} (at the end)")
    return 0
