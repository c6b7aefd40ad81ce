"""TorchTitan's checkpoint component on cloudckpt (``cloudckpt.dcp.torchtitan.CloudCheckpointManager``).

A TorchTitan folder its own manager wrote (torch's ``step-N/`` directories) is converted with
``cp`` and resumed from by cloudckpt's manager - the migration.

TorchTitan's ``CheckpointManager`` is driven directly, as its trainer drives it (``save(step)``
every step, ``load()`` at start), with a tiny model sharded by FSDP2 (``fully_shard``) over 2
spawned gloo processes, its ``OptimizersContainer`` (Adam) and ``LRSchedulersContainer``: the job
trains 3 steps into a SeaweedFS folder (keep_latest_k=2) and is SIGKILLed in the middle of the
step-4 save (data uploaded, index not written); a fresh job resumes and must get step 3
bit-exact, with step 4 invisible.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cloudckpt.storage import open_storage
from cloudckpt.testing.processes import spawn_reports

SPAWN_TIMEOUT = 180
#: Ranks: 2 gloo processes, the model sharded by FSDP2 (fully_shard) over them.
WORLD = 2


class _TrainState:
    """The trainer's own ``train_state`` (a ``Stateful``): the step."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def _manager(folder: str, seed: int, cls: Any = None, keep: int = 2) -> tuple[Any, Any, _TrainState]:
    import torch
    from torchtitan.components.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.config import Checkpoint as CheckpointConfig

    from cloudckpt.dcp.torchtitan import CloudCheckpointManager

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    if torch.distributed.get_world_size() > 1:  # FSDP2, as TorchTitan shards: every weight a Shard(0) DTensor
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    optimizers = OptimizersContainer([model], torch.optim.Adam, {"lr": 0.01})
    schedulers = LRSchedulersContainer(optimizers, lambda step: 1.0 / (1 + step))
    train_state = _TrainState()
    config = CheckpointConfig(enable=True, folder=folder, interval=1, keep_latest_k=keep)
    manager = (cls or CloudCheckpointManager)(dataloader=None, model_parts=[model], optimizers=optimizers,
                                     lr_schedulers=schedulers, states={"train_state": train_state},
                                     checkpoint_config=config, sd_adapter=None)
    return manager, model, train_state


def _digests(model: Any) -> dict[str, str]:
    """SHA-256 of every weight's full value (a collective under FSDP: every rank calls it)."""
    import hashlib

    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in full.items()}


def _lr(manager: Any) -> list[float]:
    return list(manager.states["lr_scheduler"].schedulers[0].get_last_lr())


def train_then_die(rank: int, world: int, port: int, folders: list[str], own: str, notes: str,
                   report: dict[str, Any]) -> None:
    """Spawned: 3 steps saved into each folder, then SIGKILLed in the last folder's step-4 save.

    The folder ``own`` is saved by TorchTitan's own manager (torch's FileSystemWriter), the rest by cloudckpt's.
    """
    import torch
    import torch.distributed as dist
    from torchtitan.components.checkpoint import CheckpointManager

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    saved: dict[str, Any] = {}
    for n, folder in enumerate(folders):
        theirs = folder == own
        manager, model, train_state = _manager(folder, seed=n, cls=CheckpointManager if theirs else None,
                                               keep=0 if theirs else 2)
        assert manager.load() is False  # nothing there yet: a fresh start
        x = torch.randn(8, 6)
        for step in range(1, 5):
            loss = model(x).square().mean()
            loss.backward()
            manager.states["optimizer"].step()
            manager.states["lr_scheduler"].step()
            manager.states["optimizer"].zero_grad()
            train_state.step = step
            if step == 4:
                if n == len(folders) - 1:
                    if rank == 0:
                        Path(notes).write_text(json.dumps(saved))  # what the killed job last committed
                    dist.barrier()
                    os.environ["CLOUDCKPT_CRASH_AT"] = "after_data_upload"
                else:
                    break
            manager.save(curr_step=step)
            saved[folder] = {"digests": _digests(model), "lr": _lr(manager)}
    report["unreachable"] = True


def doc_block(marker: str) -> str:
    """The ```python block of docs/dcp.md that contains ``marker``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "dcp.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    return next(b for b in blocks if marker in b)


def resume(rank: int, world: int, port: int, folders: list[str], report: dict[str, Any]) -> None:
    """Spawned: a fresh process per folder loads the latest committed step, set up by docs/dcp.md's recipe."""
    import torch.distributed as dist
    import torchtitan.train

    from cloudckpt.dcp.torchtitan import committed_steps

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    exec(compile(doc_block("torchtitan.train.CheckpointManager ="), "docs/dcp.md", "exec"), {})
    report["recipe"] = torchtitan.train.CheckpointManager.__name__
    report["trainer_builds_it"] = "= CheckpointManager(" in inspect.getsource(torchtitan.train.Trainer.__init__)
    for n, folder in enumerate(folders):
        manager, model, train_state = _manager(folder, seed=100 + n, cls=torchtitan.train.CheckpointManager)
        loaded = manager.load()
        report[folder] = {"loaded": loaded, "step": train_state.step, "digests": _digests(model),
                          "lr": _lr(manager), "steps": committed_steps(folder)}
        manager.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3_root: str) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Folders: a local TorchTitan folder torch wrote, converted by ``cp``; cloudckpt's on SeaweedFS."""
    from cloudckpt.tools import copy, verify

    base = tmp_path_factory.mktemp("titan")
    own, converted = str(base / "torch-written"), str(base / "converted")
    folders = [own, f"{s3_root}/titan/checkpoint"]
    notes = base / "saved.json"
    died = spawn_reports(train_then_die, WORLD, folders, own, str(notes), timeout=SPAWN_TIMEOUT,
                         may_die=set(range(WORLD)))
    assert all("died" in d for d in died), died  # SIGKILLed at the crash point, as a preempted VM
    assert sorted(p.name for p in Path(own).iterdir()) == ["step-1", "step-2", "step-3"]  # torch's directories
    checked = verify(own)  # a directory of torch's step-N/ directories: each one verified
    assert [c.name for c in checked.checkpoints] == ["step-1", "step-2", "step-3"] and checked.intact
    report = copy(own + "/", converted + "/")  # the migration: every step-N/ becomes a cloudckpt step-N
    assert [c.dst.rsplit("/", 1)[1] for c in report.copied] == ["step-1", "step-2", "step-3"]
    saved = json.loads(notes.read_text())
    saved[converted] = saved.pop(own)
    resumed = spawn_reports(resume, WORLD, [converted, *folders[1:]], timeout=SPAWN_TIMEOUT)[0]
    return [converted, *folders[1:]], saved, resumed


def test_resume_loads_the_last_committed_step_bit_exact(runs: tuple[list[str], dict[str, Any], dict[str, Any]]
                                                        ) -> None:
    folders, saved, resumed = runs
    for folder in folders:
        assert resumed[folder]["loaded"] is True
        assert resumed[folder]["step"] == 3
        assert resumed[folder]["digests"] == saved[folder]["digests"]  # model weights bit for bit
        assert resumed[folder]["lr"] == saved[folder]["lr"]  # the LR scheduler's state came back too


def test_a_save_killed_mid_way_leaves_the_previous_step_latest(runs: tuple[list[str], dict[str, Any],
                                                                              dict[str, Any]]) -> None:
    folders, _, resumed = runs
    s3 = folders[1]
    assert resumed[s3]["steps"] == [2, 3]  # keep_latest_k=2 removed step 1; step 4 never committed
    keys = [m.key for m in open_storage(s3).list()]
    assert any(k.startswith("step-4.data-") for k in keys)  # the killed save's data is there ...
    assert "step-4.index" not in keys  # ... but no index: invisible to a resume (gc removes the data)
    assert not any(k.startswith("step-1.") for k in keys)


def test_checkpoints_are_cloudckpt_checkpoints(runs: tuple[list[str], dict[str, Any], dict[str, Any]]) -> None:
    from cloudckpt.tools import verify

    folders, _, _ = runs
    report = verify(folders[1])
    assert [c.name for c in report.checkpoints] == ["step-2", "step-3"] and report.intact


def test_the_docs_recipe_installs_the_manager_the_trainer_builds(
        runs: tuple[list[str], dict[str, Any], dict[str, Any]]) -> None:
    _, _, resumed = runs
    assert resumed["recipe"] == "CloudCheckpointManager"  # the resume above ran through it
    assert resumed["trainer_builds_it"]  # TorchTitan's Trainer still builds its manager by that name
