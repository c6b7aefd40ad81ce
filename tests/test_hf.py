"""Hugging Face on cloudckpt: ``CloudTrainer`` and Accelerate's ``save_state`` / ``load_state``.

One spawn runs two processes at once - local disk and SeaweedFS - each saving an Accelerate
state and then training a tiny GPT-2 (built from a config, nothing from a hub) with
``CloudTrainer`` until it is SIGKILLed after the step-4 checkpoint. The test process resumes
both from the directory (``resume_from_checkpoint=True``) and compares weights, optimizer
state, step and RNG bit for bit with runs never interrupted. Dropout makes the RNG matter.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from accelerate import Accelerator  # after HF_HUB_OFFLINE is set
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import cloudckpt
from cloudckpt.hf import CloudTrainer, load_state, save_state
from cloudckpt.testing.processes import spawn_reports
from cloudckpt.tools import list_checkpoints

MAX_STEPS = 6
KILL_AT_STEP = 4


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Kill(TrainerCallback):
    """SIGKILL at the start of the step after ``KILL_AT_STEP`` (its checkpoint is committed: saves are synchronous)."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)


def _trainer(out: Path, checkpoint_dir: str, callbacks: list[Any] | None = None) -> CloudTrainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=4, save_steps=2,
                             save_total_limit=2, logging_steps=100, report_to=[], seed=1, use_cpu=True,
                             disable_tqdm=True)
    return CloudTrainer(model=model, args=args, train_dataset=Tokens(), checkpoint_dir=checkpoint_dir,
                        callbacks=callbacks)


def _accelerated() -> tuple[Accelerator, Any, Any, Any]:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.9)
    return accelerator, *accelerator.prepare(model, optimizer, scheduler)


def _accelerate_steps(accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def save_then_die(rank: int, world: int, port: int, roots: list[str], outputs: str,
                  report: dict[str, Any]) -> None:
    """Spawned: an Accelerate state saved at 3 steps, then a CloudTrainer run SIGKILLed after step 4."""
    root = roots[rank]
    accelerated = _accelerated()
    _accelerate_steps(*accelerated, 3)
    save_state(accelerated[0], f"{root}/accelerate/state")
    report["saved"] = True
    _trainer(Path(outputs) / f"out-{rank}", f"{root}/trainer", [Kill()]).train()
    report["not_killed"] = True


def test_killed_runs_resume_bit_exact_on_local_disk_and_s3(tmp_path: Path, s3_root: str) -> None:
    roots = [str(tmp_path / "run"), f"{s3_root}/hf"]
    reports = spawn_reports(save_then_die, 2, roots, str(tmp_path / "outputs"), timeout=300, may_die={0, 1})
    assert all(r.get("died") == -signal.SIGKILL for r in reports), reports

    reference = _trainer(tmp_path / "ref", str(tmp_path / "ref-ckpt"))
    reference.train()
    ref_rng = torch.get_rng_state()
    ref_acc = _accelerated()
    _accelerate_steps(*ref_acc, 6)
    for root in roots:
        resumed = _trainer(tmp_path / "out", f"{root}/trainer")
        resumed.train(resume_from_checkpoint=True)
        assert resumed.state.global_step == reference.state.global_step == MAX_STEPS
        assert torch.equal(torch.get_rng_state(), ref_rng), root
        for key, value in reference.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[key], value), (root, key)
        ours, ref = resumed.optimizer.state_dict(), reference.optimizer.state_dict()
        for param, state in ref["state"].items():
            for key, value in state.items():
                assert torch.equal(ours["state"][param][key], value), (root, param, key)
        assert resumed.lr_scheduler.state_dict() == reference.lr_scheduler.state_dict()
        listing = list_checkpoints(f"{root}/trainer")
        assert [Path(row.name).name for row in listing.checkpoints] == ["checkpoint-4", "checkpoint-6"], listing

        accelerated = _accelerated()
        load_state(accelerated[0], f"{root}/accelerate/state")
        _accelerate_steps(*accelerated, 3)
        for ours_p, ref_p in zip(accelerated[1].parameters(), ref_acc[1].parameters(), strict=True):
            assert torch.equal(ours_p, ref_p), root
        assert accelerated[2].state_dict()["state"][0]["step"] == ref_acc[2].state_dict()["state"][0]["step"]


def test_resume_from_an_empty_directory_or_a_mismatched_state_fails_by_name(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "out", str(tmp_path / "none"))
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="no checkpoint to resume from"):
        trainer.train(resume_from_checkpoint=True)
    accelerator = _accelerated()[0]
    save_state(accelerator, str(tmp_path / "acc"))
    other = Accelerator(cpu=True)
    other.prepare(torch.nn.Linear(3, 3))
    with pytest.raises(cloudckpt.CheckpointMismatchError):
        load_state(other, str(tmp_path / "acc"))
