"""Run inside spawned ``torch.distributed`` (gloo) processes by tests/test_dcp.py.

One spawn of 2 processes runs every multi-process DCP scenario (starting torch dominates
the cost); each process fills its ``report`` with plain data. The last scenario SIGKILLs
rank 1 mid-save, so rank 0 first collects rank 1's report of the earlier ones (``peer``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import distributed_worker
import numpy as np

#: Global values of the DTensors every scenario saves (the test checks loads against them).
W_SHAPE = (8, 6)
R_SHAPE = (5, 3)


def global_w(bump: int = 0) -> np.ndarray[Any, Any]:
    return (np.arange(48, dtype=np.float32).reshape(W_SHAPE) - 7) / 3 + bump


def global_r() -> np.ndarray[Any, Any]:
    return np.linspace(-1, 1, 15).reshape(R_SHAPE)


def global_b() -> np.ndarray[Any, Any]:
    return np.arange(7, dtype=np.int64) * 3 - 5


def digest(tensor: Any) -> str:
    """SHA-256 of a tensor's bytes (a DTensor's full tensor), for bit-exact comparisons across processes."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return hashlib.sha256(full.detach().contiguous().view(-1).view(__import__("torch").uint8).numpy()).hexdigest()


def model_and_optimizer(mesh: Any) -> tuple[Any, Any]:
    """A 2-layer model whose weights are ``Shard(0)`` DTensors (biases replicated), after one Adam step."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    for layer in model:
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]))
        layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Replicate()]))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return model, optimizer


def full_digests(state: dict[str, Any]) -> dict[str, str]:
    """FQN -> digest of every tensor in a (nested) state dict, FQNs as DCP flattens them."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return {fqn: digest(v) for fqn, v in flat.items() if isinstance(v, torch.Tensor)}


def byte_item_fqns(state: dict[str, Any]) -> list[str]:
    """The FQNs DCP stores as serialized byte items (everything that is not a tensor)."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return sorted(fqn for fqn, v in flat.items() if not isinstance(v, torch.Tensor))


def _params(mesh: Any, placement: Any, w: np.ndarray[Any, Any] | None) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import Replicate, distribute_tensor

    return {"W": distribute_tensor(torch.from_numpy(w.copy()) if w is not None else torch.zeros(W_SHAPE), mesh,
                                   [placement]),
            "R": distribute_tensor(torch.from_numpy(global_r()) if w is not None else torch.zeros(R_SHAPE,
                                                                                                 dtype=torch.float64),
                                   mesh, [Replicate()]),
            "B": torch.from_numpy(global_b()) if w is not None else torch.zeros(7, dtype=torch.int64)}


def _state(mesh: Any) -> tuple[dict[str, Any], Any, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import Shard

    model, optimizer = model_and_optimizer(mesh)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"params": _params(mesh, Shard(0), global_w()), "model": model_sd, "optim": optim_sd, "step": 5,
             "name": "run-1", "extra": {"epoch": 2, "tags": ["a", "b"]}}
    return state, model, optimizer


def _check_load(mesh: Any, url: str, placement: Any, problems: list[str], label: str, bump: int = 0) -> None:
    """Load ``url`` into fresh tensors laid out with ``placement`` and compare everything bit for bit."""
    import torch
    import torch.distributed.checkpoint as dcp

    from cloudckpt.dcp import StorageReader

    dest = {"params": _params(mesh, placement, None), "step": 0, "name": "", "extra": {"epoch": 0, "tags": []}}
    dcp.load(dest, storage_reader=StorageReader(url))
    if not torch.equal(dest["params"]["W"].full_tensor(), torch.from_numpy(global_w(bump))):
        problems.append(f"{label}: W differs")
    if not torch.equal(dest["params"]["R"].full_tensor(), torch.from_numpy(global_r())):
        problems.append(f"{label}: R differs")
    if not torch.equal(dest["params"]["B"], torch.from_numpy(global_b())):
        problems.append(f"{label}: B differs")
    if (dest["step"], dest["name"], dest["extra"]) != (5, "run-1", {"epoch": 2, "tags": ["a", "b"]}):
        problems.append(f"{label}: non-tensor values differ: {dest['step']!r} {dest['name']!r} {dest['extra']!r}")


def _check_model_load(mesh: Any, url: str, saved: dict[str, str], problems: list[str], label: str) -> None:
    """A fresh model + Adam restored with ``set_state_dict`` matches the saved state exactly."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from cloudckpt.dcp import StorageReader

    model, optimizer = model_and_optimizer(mesh)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for s in optimizer.state.values():
        for v in s.values():
            v.zero_()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dest = {"model": model_sd, "optim": optim_sd}
    dcp.load(dest, storage_reader=StorageReader(url))
    set_state_dict(model, optimizer, model_state_dict=dest["model"], optim_state_dict=dest["optim"])
    now = full_digests(dict(zip(("model", "optim"), get_state_dict(model, optimizer), strict=True)))
    differing = sorted(k for k in saved if k.startswith(("model.", "optim.")) and now.get(k) != saved[k])
    if differing:
        problems.append(f"{label}: model/optimizer values differ: {differing}")


def _dcp_failure(call: Callable[[], Any]) -> dict[str, Any] | None:
    """Run a DCP call expected to fail: what its ``CheckpointException`` says (``None`` if it succeeded)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        call()
    except CheckpointException as exc:
        return {"ranks": sorted(exc.failures), "message": str(exc),
                "types": {str(r): type(e).__name__ for r, (e, _) in exc.failures.items()}}
    return None


def _process_async_saves(mesh: Any, state: dict[str, Any], root: str, problems: list[str]) -> list[str]:
    """Two ``dcp.async_save(..., AsyncCheckpointerType.PROCESS)`` saves, checked by loading; then the
    checkpoint process is stopped (it would outlive a SIGKILLed rank otherwise). Returns their URLs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import _async_process_executor as executor
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.tensor import Replicate, Shard

    from cloudckpt.dcp import StorageWriter

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # where the checkpoint processes meet (else: hostname)
    urls = [f"{root}/ck-1", f"{root}/ck-2"]
    try:
        for bump, url in enumerate(urls, start=3):
            staged = {**state, "params": _params(mesh, Shard(0), global_w(bump))}
            future = dcp.async_save(staged, storage_writer=StorageWriter(url),
                                    async_checkpointer_type=AsyncCheckpointerType.PROCESS)
            future.result(timeout=180)
            _check_load(mesh, url, Replicate(), problems, f"process async {url}", bump=bump)
    finally:
        process, executor._CHECKPOINT_PROCESS = executor._CHECKPOINT_PROCESS, None
        if process is not None:
            process.__del__()  # TERMINATE, join (5 s), else SIGTERM
    return urls


def two_ranks(rank: int, world: int, port: int, s3_root: str, gcs_root: str, report: dict[str, Any]) -> None:
    """Spawned 2x: every multi-process DCP scenario, ending with a SIGKILL of rank 1 mid-save."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    import cloudckpt
    from cloudckpt import CheckpointManager, CheckpointOptions, PreemptionCheckpointHandler
    from cloudckpt.coordination import TorchCoordinator, set_default_coordinator
    from cloudckpt.dcp import DCPCheckpoint, StorageWriter
    from cloudckpt.errors import ConcurrentWriterError
    from cloudckpt.storage import register_storage

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    set_default_coordinator(TorchCoordinator(timeout=30))
    mesh = init_device_mesh("cpu", (world,))
    storage = distributed_worker.counting_storage(s3_root)
    register_storage(storage)
    problems: list[str] = []

    # 1. Save the same state on SeaweedFS (path in the constructor) and fake-gcs-server
    #    (checkpoint_id= given to dcp.save); 2. load on 2 ranks as Shard(1) and Replicate().
    state, _, _ = _state(mesh)
    report["digests"] = full_digests(state)
    report["byte_items"] = byte_item_fqns(state)
    dcp.save(state, storage_writer=StorageWriter(f"{s3_root}/ck-1"))
    dcp.save(state, checkpoint_id=f"{gcs_root}/ck-1", storage_writer=StorageWriter())
    for root in (s3_root, gcs_root):
        for placement in (Shard(1), Replicate()):
            _check_load(mesh, f"{root}/ck-1", placement, problems, f"{root} {placement}")
        _check_model_load(mesh, f"{root}/ck-1", report["digests"], problems, root)

    # 3. async_save of changed values, while the caller changes them again.
    async_state = {**state, "params": _params(mesh, Shard(0), global_w(1))}
    future = dcp.async_save(async_state, storage_writer=StorageWriter(f"{s3_root}/ck-async"))
    async_state["params"]["W"].to_local().add_(100)  # after staging: must not reach the checkpoint
    future.result(timeout=120)
    _check_load(mesh, f"{s3_root}/ck-async", Shard(1), problems, "async", bump=1)

    # 3b. async_save in DCP's checkpoint process (AsyncCheckpointerType.PROCESS): torch pickles
    #     the writer into a spawned process per rank, which sets up its own gloo group; the
    #     writer reopens its storage there from the URL (not under a registered storage).
    #     Two saves: the second reuses the process and its coordinator.
    report["process_async"] = _process_async_saves(mesh, state, f"{s3_root}/proc", problems)

    # 4. A committed checkpoint is not overwritten without overwrite=True; with it, it is replaced.
    bumped = {**state, "params": _params(mesh, Shard(0), global_w(2))}
    report["refused"] = _dcp_failure(lambda: dcp.save(bumped, storage_writer=StorageWriter(f"{s3_root}/ck-1")))
    _check_load(mesh, f"{s3_root}/ck-1", Shard(0), problems, "after refused overwrite")
    dist.barrier()
    report["before_overwrite"] = sorted(m.key for m in storage.list("ck-1.")) if rank == 0 else []
    dist.barrier()
    dcp.save(bumped, storage_writer=StorageWriter(f"{s3_root}/ck-1", overwrite=True))
    _check_load(mesh, f"{s3_root}/ck-1", Replicate(), problems, "overwritten", bump=2)
    report["after_overwrite"] = sorted(m.key for m in storage.list("ck-1.")) if rank == 0 else []

    # 5. Rank 1's data uploads fail: every rank fails, no index, no data objects anywhere.
    storage.fail_data_puts = rank == 1
    report["failure"] = _dcp_failure(lambda: dcp.save(state, storage_writer=StorageWriter(f"{s3_root}/ck-fail")))
    storage.fail_data_puts = False
    dist.barrier()

    # 6. The manager over DCPCheckpoint: numbering, retention, async save + sync, resume on
    #    another layout, preemption on one rank, fencing by another writer.
    managed = f"{s3_root}/managed"
    managed_storage = distributed_worker.counting_storage(managed)
    register_storage(managed_storage)
    app = {"params": _params(mesh, Shard(0), global_w())}
    manager = CheckpointManager(DCPCheckpoint(app), managed, max_to_keep=2)
    report["managed_initial"] = manager.restore_or_initialize()
    saved = []
    for i in range(1, 4):
        app["params"]["W"].to_local().copy_(_params(mesh, Shard(0), global_w(i))["W"].to_local())
        options = CheckpointOptions(enable_async=True) if i == 3 else None
        managed_storage.counts.clear()
        saved.append(manager.save(options=options))
        if i == 2:  # incremental on ckpt-1: its index is read by rank 0 alone and broadcast
            report["managed_incremental_index_requests"] = managed_storage.counts["index_requests"]
    manager.sync()
    report["managed_saved"] = saved
    report["managed_checkpoints"] = manager.checkpoints
    report["managed_latest"] = cloudckpt.latest_checkpoint(managed)
    fresh = {"params": _params(mesh, Replicate(), None)}
    resumed = CheckpointManager(DCPCheckpoint(fresh), managed, max_to_keep=2)
    managed_storage.counts.clear()
    report["managed_resumed"] = resumed.restore_or_initialize()
    report["managed_resume_index_requests"] = managed_storage.counts["index_requests"]
    report["managed_resumed_counter"] = int(resumed.checkpoint.save_counter)
    if not torch.equal(fresh["params"]["W"].full_tensor(), torch.from_numpy(global_w(3))):
        problems.append("managed: resumed W differs")
    exits: list[int] = []
    handler = PreemptionCheckpointHandler(resumed, signals=(), exit_fn=lambda: exits.append(1))
    report["managed_preempted_at"] = None
    for step in range(4):
        if rank == 1 and step == 2:
            handler.request_preemption()
        if handler.save_checkpoint_if_preempted() is not None:
            report["managed_preempted_at"] = step
            break
    report["managed_exits"] = len(exits)
    report["managed_after_preemption"] = resumed.checkpoints
    if rank == 0:
        from cloudckpt import Checkpoint, Variable
        CheckpointManager(Checkpoint(v=Variable(1.0)), managed, max_to_keep=5).save(checkpoint_number=100)
    dist.barrier()
    try:
        resumed.save()
        report["managed_fenced"] = None
    except ConcurrentWriterError as exc:
        report["managed_fenced"] = str(exc)
    report["problems"] = problems

    # 7. Rank 1 is SIGKILLed after uploading its data: no checkpoint; rank 0 fails and says why.
    peers: list[Any] = [None] * world
    dist.all_gather_object(peers, dict(report))
    report["peer"] = peers[1] if rank == 0 else None
    killed = f"{s3_root}/killed"
    victim = CheckpointManager(DCPCheckpoint({"params": _params(mesh, Shard(0), global_w())}), killed,
                               max_to_keep=3)
    report["killed_first"] = victim.save()
    victim.checkpoint.app_state["params"]["W"].to_local().add_(1)  # new bytes to upload (the rest is reused)
    if rank == 1:
        os.environ["CLOUDCKPT_CRASH_AT"] = "after_data_upload"
    try:
        victim.save()
        report["killed_save"] = None
    except Exception as exc:
        report["killed_save"] = f"{type(exc).__name__}: {exc}"
