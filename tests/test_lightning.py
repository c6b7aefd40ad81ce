"""Lightning on cloudckpt: ``CloudCheckpointIO`` under a real ``Trainer`` and ``ModelCheckpoint``.

One spawn runs two training processes at once, each killed by SIGKILL after its epoch-2
checkpoint committed: on local disk (the plain plugin) and on SeaweedFS (wrapped in
Lightning's ``AsyncCheckpointIO``). The test process then resumes each - ``ckpt_path="last"``
locally, the explicit ``s3://.../last.ckpt`` on the bucket - and compares weights, optimizer
state, step and the torch RNG bit for bit with a run that was never interrupted. The model
uses dropout and a callback keeps the RNG state as ``bytes``, so a resume that lost the RNG
or the bytes would train differently.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import cloudckpt
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.lightning import CloudCheckpointIO
from cloudckpt.lightning.values import from_storable, parse_tags, to_storable
from cloudckpt.testing.processes import spawn_reports
from cloudckpt.tools import CheckpointInfo, inspect_checkpoint, verify
from cloudckpt.tools.export_hf import export_hf

STEPS_PER_EPOCH = 2
KILL_AT_STEP = 4  # after the checkpoints of epochs 0 and 1
EPOCHS = 4


class Tiny(L.LightningModule):
    """A two-layer net with dropout (so the RNG matters) and hyperparameters of awkward types."""

    def __init__(self, lr: float = 0.05, tags: frozenset[str] = frozenset({"a", "b"})) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)}


class KeepRng(Callback):
    """Lightning keeps no RNG state in its checkpoint; this keeps the torch RNG as ``bytes`` and a set."""

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = {"torch": torch.get_rng_state().numpy().tobytes(), "seen": {trainer.global_step, -1}}

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        assert isinstance(checkpoint["rng"]["torch"], bytes) and isinstance(checkpoint["rng"]["seen"], set)
        torch.set_rng_state(torch.frombuffer(bytearray(checkpoint["rng"]["torch"]), dtype=torch.uint8))


class KillAt(Callback):
    """SIGKILLs this process at step ``KILL_AT_STEP``, once ``last`` holds that step (an async save committed)."""

    def __init__(self, last: str) -> None:
        self.last = last

    def _committed(self) -> bool:
        try:
            return int(cloudckpt.load_variable(self.last, "lightning/global_step")) == KILL_AT_STEP
        except cloudckpt.NotFoundError:
            return False

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, index: int) -> None:
        if trainer.global_step < KILL_AT_STEP:
            return
        deadline = time.monotonic() + 60
        while not self._committed() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)


class CountSteps(Callback):
    """Counts the steps this process trained (a resume that found no checkpoint trains them all)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def _trainer(root: str | None, epochs: int, io: Any = None, extra: tuple[Callback, ...] = ()) -> L.Trainer:
    callbacks: list[Callback] = [KeepRng(), *extra]
    if root is not None:
        callbacks.append(ModelCheckpoint(dirpath=root, monitor="step", mode="max", save_top_k=2, save_last=True))
    return L.Trainer(max_epochs=epochs, plugins=[io] if io is not None else None, callbacks=callbacks,
                     enable_checkpointing=root is not None, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, deterministic=True, accelerator="cpu", devices=1)


def _data() -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(7)
    return DataLoader(TensorDataset(torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)),
                      batch_size=8 // STEPS_PER_EPOCH)


def _io(root: str) -> Any:
    return AsyncCheckpointIO(CloudCheckpointIO()) if root.startswith("s3://") else CloudCheckpointIO()


def train_and_die(rank: int, world: int, port: int, roots: list[str], report: dict[str, Any]) -> None:
    """Spawned: train under ``roots[rank]`` until SIGKILLed at step ``KILL_AT_STEP``."""
    root = roots[rank]
    L.seed_everything(3, verbose=False)
    report["started"] = True
    _trainer(root, EPOCHS, _io(root), (KillAt(f"{root}/last.ckpt"),)).fit(Tiny(), _data())
    report["not_killed"] = True


def _finish(root: str | None, ckpt_path: str | None) -> tuple[Tiny, L.Trainer, int]:
    """Train to the end (from ``ckpt_path``, if given); the model, trainer and steps trained here."""
    L.seed_everything(3, verbose=False)
    model, counter = Tiny(), CountSteps()
    trainer = _trainer(root, EPOCHS, _io(root) if root is not None else None, (counter,))
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return model, trainer, counter.steps


def test_killed_runs_resume_bit_exact_on_local_disk_and_s3(tmp_path: Path, s3_root: str) -> None:
    roots = [str(tmp_path / "run"), f"{s3_root}/lightning"]
    reports = spawn_reports(train_and_die, 2, roots, timeout=240, may_die={0, 1})
    assert all("died" in r and "crash" not in r for r in reports), reports

    reference, ref_trainer, _ = _finish(None, None)
    ref_rng = torch.get_rng_state()
    for root, ckpt_path in ((roots[0], "last"), (roots[1], f"{roots[1]}/last.ckpt")):
        model, trainer, steps = _finish(root, ckpt_path)
        assert steps == EPOCHS * STEPS_PER_EPOCH - KILL_AT_STEP, (root, "resumed from the epoch-1 checkpoint")
        assert trainer.global_step == ref_trainer.global_step == EPOCHS * STEPS_PER_EPOCH
        assert torch.equal(torch.get_rng_state(), ref_rng), root
        for key, value in reference.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (root, key)
        ours, ref = trainer.optimizers[0].state_dict(), ref_trainer.optimizers[0].state_dict()
        for param, state in ref["state"].items():
            for key, value in state.items():
                assert torch.equal(ours["state"][param][key], value), (root, param, key)
        assert ours["param_groups"] == ref["param_groups"]

        report = verify(root)
        assert not report.damaged, report
        names = sorted(Path(c.url).name for c in report.checkpoints)
        assert names == ["epoch=2-step=6.ckpt", "epoch=3-step=8.ckpt", "last.ckpt"], (root, names)
        loaded = CloudCheckpointIO().load_checkpoint(f"{root}/last.ckpt")
        assert loaded["global_step"] == 8 and loaded["hyper_parameters"]["tags"] == frozenset({"a", "b"})
        assert loaded["rng"]["seen"] == {8, -1} and loaded["epoch"] == 3
    assert sorted(p.name for p in Path(roots[0]).iterdir() if not p.name.count(".data-")) == [
        "epoch=2-step=6.ckpt", "epoch=2-step=6.ckpt.index", "epoch=3-step=8.ckpt", "epoch=3-step=8.ckpt.index",
        "last.ckpt", "last.ckpt.index"]


@pytest.mark.parametrize("backend", ["local", "gcs"])
def test_removal_keeps_pieces_a_later_incremental_checkpoint_names(backend: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    root = str(tmp_path / "run") if backend == "local" else f"gs://{request.getfixturevalue('gcs_bucket')}/lt"
    storage = cloudckpt.storage.resolve(f"{root}/x").storage
    io = CloudCheckpointIO()
    frozen = torch.arange(1000, dtype=torch.float32)
    io.save_checkpoint({"state_dict": {"frozen": frozen, "head": torch.zeros(3)}}, f"{root}/a.ckpt")
    io.save_checkpoint({"state_dict": {"frozen": frozen, "head": torch.ones(3)}}, f"{root}/b.ckpt")
    index = cloudckpt.CheckpointReader(f"{root}/b.ckpt")
    assert index.metadata["lightning"]["version"] == 1
    io.remove_checkpoint(f"{root}/a.ckpt")
    keys = [m.key for m in storage.list()]
    assert "a.ckpt" not in keys and "a.ckpt.index" not in keys
    assert any(k.startswith("a.ckpt.data-") for k in keys), "b.ckpt reuses a's piece"
    loaded = io.load_checkpoint(f"{root}/b.ckpt")
    assert torch.equal(loaded["state_dict"]["frozen"], frozen) and torch.equal(loaded["state_dict"]["head"],
                                                                               torch.ones(3))
    resumed = CloudCheckpointIO()  # a new process: its first save builds on the checkpoint it loaded
    resumed.load_checkpoint(f"{root}/b.ckpt")
    resumed.save_checkpoint({"state_dict": {"frozen": frozen, "head": torch.full((3,), 2.0)}}, f"{root}/c.ckpt")
    info = inspect_checkpoint(f"{root}/c.ckpt")
    assert isinstance(info, CheckpointInfo) and info.shared_bytes.keys() == {"a.ckpt"}, "frozen is a's piece"
    resumed.remove_checkpoint(f"{root}/c.ckpt")
    report = export_hf(f"{root}/b.ckpt", tmp_path / "hf", prefix="lightning/state_dict/", strip_prefix=True)
    assert report.tensors == 2 and sorted(load_file(tmp_path / "hf" / report.shards[0])) == ["frozen", "head"]
    io.remove_checkpoint(f"{root}/b.ckpt")
    io.remove_checkpoint(f"{root}/b.ckpt")  # gone already: no error, as Lightning expects
    assert storage.list() == []


def test_values_lightning_holds_round_trip_and_the_rest_is_refused_by_key(tmp_path: Path) -> None:
    checkpoint = {
        "hyper_parameters": AttributeDict(lr=0.1, layers=(1, 2), names={"x", "y"}),
        "args": argparse.Namespace(seed=3, flags=frozenset({1, 2})),
        "blob": b"\x00\x01raw", "empty": b"", "opt": {0: {"step": torch.tensor(3.0)}},
        "bf16": torch.ones(3, dtype=torch.bfloat16), "none": None, "nested": [{"s": {"z"}}],
    }
    io = CloudCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "v.ckpt")
    loaded = io.load_checkpoint(str(tmp_path / "v.ckpt"), map_location="cpu")
    assert isinstance(loaded["hyper_parameters"], AttributeDict)
    assert loaded["hyper_parameters"] == {"lr": 0.1, "layers": (1, 2), "names": {"x", "y"}}
    assert loaded["args"] == argparse.Namespace(seed=3, flags=frozenset({1, 2}))
    assert loaded["blob"] == b"\x00\x01raw" and loaded["empty"] == b"" and loaded["nested"] == [{"s": {"z"}}]
    assert torch.equal(loaded["opt"][0]["step"], torch.tensor(3.0)) and loaded["bf16"].dtype == torch.bfloat16

    with pytest.raises(ValueError, match=r"'lightning/hyper_parameters/dtype'.*torch\.dtype"):
        io.save_checkpoint({"hyper_parameters": {"dtype": torch.float16}}, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists() and not (tmp_path / "bad.ckpt.index").exists()
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, tmp_path / "o.ckpt", storage_options={"x": 1})
    with pytest.raises(cloudckpt.CheckpointNotFoundError, match="TorchCheckpointIO"):
        io.load_checkpoint(tmp_path / "missing.ckpt")

    tuned = CloudCheckpointIO(storage_options={"config": cloudckpt.TransferConfig(max_concurrency=2)})
    tuned.save_checkpoint({"w": torch.ones(2)}, tmp_path / "t.ckpt")
    assert torch.equal(tuned.load_checkpoint(tmp_path / "t.ckpt")["w"], torch.ones(2))
    assert [s.config.max_concurrency for s in tuned._storages.values()] == [2]


def test_tags_from_an_untrusted_index_are_checked() -> None:
    tree, tags = to_storable({"s": {1, 2}, "t": ({"q"},)})
    assert tags == {"s": "set", "t/0": "set"} and tree == {"s": [1, 2], "t": (["q"],)}
    with pytest.raises(CheckpointFormatError, match="not one of"):
        parse_tags({"lightning": {"version": 1, "types": {"s": "pickle"}}}, "here")
    with pytest.raises(CheckpointFormatError, match="hold no list or dict"):
        from_storable(tree, {"gone": "set"}, "here")
    with pytest.raises(CheckpointFormatError, match="hold no list or dict"):
        from_storable({"s": 3}, {"s": "set"}, "here")
    with pytest.raises(CheckpointFormatError, match="tagged namespace but holds a list"):
        from_storable({"s": [1]}, {"s": "namespace"}, "here")
    with pytest.raises(CheckpointFormatError, match="unhashable"):
        from_storable({"s": [[1]]}, {"s": "set"}, "here")
    with pytest.raises(ValueError, match="cycle"):
        loop: dict[str, Any] = {}
        loop["self"] = loop
        to_storable(loop)
    assert np.array_equal(np.frombuffer(b"ab", dtype=np.uint8), [97, 98])


def test_the_fsspec_view_answers_lightnings_file_calls_on_a_bucket(s3_root: str) -> None:
    import fsspec

    from cloudckpt.lightning.fs import CloudFileSystem

    fs = fsspec.filesystem("s3")
    assert isinstance(fs, CloudFileSystem), "no s3fs here: the view serves s3://"
    base = f"{s3_root}/fsview"
    bare = base.removeprefix("s3://")
    with fs.open(f"{base}/run/best_k_models.yaml", "w") as out:
        out.write("a.ckpt: 0.5\n")
    fs.makedirs(f"{base}/run", exist_ok=True)
    assert fs.exists(f"{base}/run/best_k_models.yaml") and fs.isdir(f"{base}/run") and not fs.exists(f"{base}/no")
    assert fs.ls(base, detail=False) == [f"{bare}/run"]
    assert fs.ls(f"{base}/run", detail=False) == [f"{bare}/run/best_k_models.yaml"]
    with fs.open(f"{base}/run/best_k_models.yaml", "r") as source:
        assert source.read() == "a.ckpt: 0.5\n"
    assert fs.modified(f"{base}/run/best_k_models.yaml").year >= 2024
    fs.rm(f"{base}/run", recursive=True)
    assert not fs.exists(f"{base}/run") and not fs.exists(f"{base}/run/best_k_models.yaml")


def test_a_removal_during_an_async_save_waits_for_its_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``AsyncCheckpointIO``'s order: ``ModelCheckpoint`` removes a and b on the training thread while the
    save of c - which references a piece a wrote, through b - is about to commit on the worker thread."""
    commit_module = importlib.import_module("cloudckpt.saving.commit")
    original = commit_module._confirm_earlier_objects
    started, go = threading.Event(), threading.Event()

    def paused(*args: Any) -> None:
        started.set()
        assert go.wait(30)
        original(*args)

    io = CloudCheckpointIO()
    frozen = torch.arange(1000, dtype=torch.float32)
    for name, head in (("a", 0.0), ("b", 1.0)):
        state = {"state_dict": {"frozen": frozen, "head": torch.full((3,), head)}}
        io.save_checkpoint(state, tmp_path / f"{name}.ckpt")
    monkeypatch.setattr(commit_module, "_confirm_earlier_objects", paused)
    errors: list[BaseException] = []

    def save_c() -> None:
        try:
            io.save_checkpoint({"state_dict": {"frozen": frozen, "head": torch.full((3,), 2.0)}}, tmp_path / "c.ckpt")
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    worker = threading.Thread(target=save_c)
    worker.start()
    assert started.wait(30)
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "b.ckpt")
    assert (tmp_path / "b.ckpt.index").exists(), "queued while the save is in flight, not run"
    go.set()
    worker.join(30)
    assert not errors, errors
    assert not (tmp_path / "a.ckpt.index").exists() and not (tmp_path / "b.ckpt").exists()
    assert torch.equal(io.load_checkpoint(tmp_path / "c.ckpt")["state_dict"]["frozen"], frozen)
    assert not verify(str(tmp_path / "c.ckpt")).damaged
