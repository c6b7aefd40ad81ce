"""Functions run inside spawned ``torch.distributed`` (gloo) processes by tests/test_tiers_multiprocess.py.

Four hosts (one process each, failure domain = rank) save a ``DTensorCheckpoint`` - W sharded
over the hosts, R replicated on every host (written once, read by all) - to a local tier
with ``replicas=1`` every step and to the bucket (SeaweedFS) every 5. ``train`` is the first
incarnation, killed by SIGKILL on one host mid-local-save; ``resume`` is the next one, run
after the test wiped that host's directory, through five scenarios. Bucket requests are
counted per process (``distributed_worker.counting_storage``), so a report proves how many
data GETs a resume made.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
from distributed_worker import _init, counting_storage

KILLED_RANK = 3
KILLED_AT = 7
#: At this step host 1 fails to store the replica it receives: every host's local save fails.
REPLICA_FAILS_AT = 3


def expected(step: int) -> dict[str, np.ndarray[Any, Any]]:
    return {"W": (np.arange(16 * 6, dtype=np.float32).reshape(16, 6) - 40) * step / 3,
            "R": np.linspace(-1, 1, 12).reshape(4, 3) * step}


def _job(rank: int, world: int, coordinator: Any, bucket: str, local_root: str) -> Any:
    from cloudckpt import CheckpointManager, DTensorCheckpoint, Layout, LocalTier, Mesh, ShardedArray, Variable

    mesh = Mesh(["x"], [world], coordinator=coordinator)
    w = ShardedArray((16, 6), np.float32, Layout(["x", "unsharded"], mesh))
    r = ShardedArray((4, 3), np.float64, Layout.replicated(mesh, 2))
    step = Variable(0)
    ckpt = DTensorCheckpoint(mesh, W=w, R=r, step=step)
    tier = LocalTier(Path(local_root, f"host{rank}"), replicas=1, max_to_keep=2, failure_domain=f"host{rank}")
    manager = CheckpointManager(ckpt, bucket, max_to_keep=3, local_tier=tier)
    return manager, {"W": w, "R": r}, step


def _assign(arrays: dict[str, Any], step: int) -> None:
    for name, array in arrays.items():
        for (start, extent), shard in zip(array.local_boxes(), array.local_shards, strict=True):
            shard[...] = expected(step)[name][tuple(slice(s, s + n) for s, n in zip(start, extent, strict=True))]


def _problems(arrays: dict[str, Any], step: int) -> list[str]:
    out = []
    for name, array in arrays.items():
        for (start, extent), shard in zip(array.local_boxes(), array.local_shards, strict=True):
            box = tuple(slice(s, s + n) for s, n in zip(start, extent, strict=True))
            if not np.array_equal(shard, expected(step)[name][box]):
                out.append(f"{name} at {start} is not step {step}'s")
    return out


def train(rank: int, world: int, port: int, bucket: str, local_root: str, report: dict[str, Any]) -> None:
    """Local saves every step, the bucket every 5; host 3 dies by SIGKILL in the middle of step 7's local save."""
    from cloudckpt.errors import SaveError
    from cloudckpt.manager.tiers import runner
    from cloudckpt.manager.tiers.holdings import HostDirectory

    coordinator = _init(rank, world, port)
    manager, arrays, step = _job(rank, world, coordinator, bucket, local_root)
    assert manager.restore_or_initialize() is None
    real = getattr(runner, "replicate")  # noqa: B009 - a module attribute the test swaps
    real_land = HostDirectory.land

    def _failing_land(self: Any, key: str, size: int) -> Any:
        if ".data-" in key and f".data-{1:05d}-" not in key:  # a replica: its own shard is data-00001
            raise OSError("injected: no space left for the replica")
        return real_land(self, key, size)

    def dies_mid_save(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)  # its shards of step 7 are on its disk, replicated nowhere

    for s in range(1, KILLED_AT + 1):
        _assign(arrays, s)
        step.assign(s)
        if s == KILLED_AT and rank == KILLED_RANK:
            setattr(runner, "replicate", dies_mid_save)  # noqa: B010
        if s == REPLICA_FAILS_AT and rank == 1:  # host 1 cannot store the replica it receives
            setattr(HostDirectory, "land", _failing_land)  # noqa: B010
        try:
            report.setdefault("saved", []).append(manager.save(checkpoint_number=s, tier="local"))
        except Exception as exc:
            report.setdefault("errors", {})[str(s)] = f"{type(exc).__name__}: {exc}"
            if s == REPLICA_FAILS_AT and isinstance(exc, SaveError):
                report["replica_failure"] = str(exc)  # every host fails that save, and goes on
                continue
            # The survivors at step 7: the save fails on the dead peer - in the tier's replication, or
            # (when host 3 died before a slower survivor left the pipeline's last collective) as the
            # pipeline's DistributedSaveError, also a SaveError: which one is timing, not a bug.
            report["failed_at"] = s
            break
        finally:
            setattr(runner, "replicate", real)  # noqa: B010
            setattr(HostDirectory, "land", real_land)  # noqa: B010
        if s % 5 == 0:
            report.setdefault("saved", []).append(manager.save(checkpoint_number=s))
        if s == 4:  # step 4 to the bucket from the hosts' local copies, committed at the next save
            report.setdefault("saved", []).append(manager.save(from_local=True))


def resume(rank: int, world: int, port: int, bucket: str, local_root: str, report: dict[str, Any]) -> None:
    """The next incarnation, host 3's directory wiped (a replacement VM): five resumes in turn."""
    import time

    import torch.distributed as dist

    from cloudckpt.storage import register_storage

    coordinator = _init(rank, world, port)
    counting = counting_storage(bucket)
    register_storage(counting)
    mine = Path(local_root, f"host{rank}")

    def attempt(label: str) -> None:
        counting.counts.clear()
        manager, arrays, step = _job(rank, world, coordinator, bucket, local_root)
        started = time.monotonic()
        path = manager.restore_or_initialize()
        report.setdefault("seconds", {})[label] = time.monotonic() - started
        report[label] = {"path": path, "step": int(step.numpy()), "problems": _problems(arrays, int(step.numpy())),
                         "bucket_data_gets": counting.counts["data_bytes_read"], "bucket_counts": dict(counting.counts),
                         "received": manager._tier.received,
                         "files": sorted(p.name for p in mine.glob("ckpt-*")),
                         "manifests": sorted(p.name for p in mine.glob("tier/*"))}
        dist.barrier()

    # A. A replaced host (empty disk): step 6 is complete on its replica holder.
    attempt("replaced")
    # B. The copy of host 3's step-6 shard on its replica holder (host 0) gets a flipped byte: host 3's
    #    own copy serves. B2: host 3 replaced again and every other copy flipped: step 5 is restored.
    if rank == (KILLED_RANK + 1) % world:
        report["flipped"] = _flip_written_by(mine, "ckpt-6", KILLED_RANK)
    dist.barrier()
    attempt("flipped_replica")
    if rank == KILLED_RANK:
        shutil.rmtree(mine)
    else:
        report["flipped_everywhere"] = _flip_written_by(mine, "ckpt-6", KILLED_RANK)
    dist.barrier()
    attempt("every_copy_flipped")
    # C. A host and its replica holder both lost.
    if rank in (KILLED_RANK, (KILLED_RANK + 1) % world):
        shutil.rmtree(mine)
    dist.barrier()
    attempt("host_and_replica_lost")
    # D. Every local tier wiped.
    shutil.rmtree(mine, ignore_errors=True)
    dist.barrier()
    attempt("all_wiped")


def _flip_written_by(directory: Path, name: str, rank: int) -> str | None:
    """Flip a byte inside a chunk of the data object of ``name`` that ``rank`` wrote (as the manifest
    says), if this host holds it."""
    from cloudckpt.format import ArrayEntry, decode_index
    from cloudckpt.manager.tiers.holdings import Manifest

    manifest = Manifest.parse(Path(directory, "tier", f"{name}.json").read_bytes(), name)
    key = next(k for k, r in manifest.owners.items() if r == rank)
    index = decode_index(Path(directory, f"{name}.index").read_bytes(), name, str(directory))
    position = [o.name for o in index.objects].index(key)
    offset = next(c.offset for e in index.entries.values() if isinstance(e, ArrayEntry) for c in e.chunks
                  if c.object == position)
    if not Path(directory, key).exists():
        return None
    data = bytearray(Path(directory, key).read_bytes())
    original = _ORIGINAL.setdefault(f"{directory}/{key}", data[offset])
    data[offset] = original ^ 0x01  # damaged, even if already flipped once (or repaired since)
    Path(directory, key).write_bytes(bytes(data))
    return key


_ORIGINAL: dict[str, int] = {}
