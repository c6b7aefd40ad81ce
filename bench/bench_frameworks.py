"""Framework doors: Lightning's and Hugging Face's checkpoints on S3, cloudckpt against what their users use.

One SeaweedFS (``weed mini`` on 127.0.0.1, stopped by its PID) serves every run; one process.

- **Lightning**: a real checkpoint dict (``trainer._checkpoint_connector.dump_checkpoint()`` after
  one training step of a model of ``--size-mib`` of float32 weights + Adam state) saved and loaded
  by ``cloudckpt.lightning.CloudCheckpointIO`` and by s3torchconnector's ``S3LightningCheckpoint``
  (AWS CRT client, ``torch.save`` into an S3 stream; ``force_path_style``). Timed: the plugin's
  ``save_checkpoint`` (what blocks ``ModelCheckpoint`` on the training thread) and ``load_checkpoint``.
- **Hugging Face Trainer**: a GPT-2 built from a config (same size rule) after one step.
  cloudckpt: ``CloudTrainer._save_checkpoint`` to the bucket; the peer: ``Trainer._save_checkpoint``
  into a local directory (safetensors + ``torch.save``, as every Trainer run does) then every file
  uploaded with boto3's ``upload_file`` (its default multipart transfer). Restore: the Trainer's
  ``_load_from_checkpoint`` + ``_load_optimizer_and_scheduler`` + ``_load_rng_state`` - cloudckpt
  reading the bucket, the peer after ``download_file`` of every object into a fresh directory.

Paths run ``--repeat`` times, interleaved; the best time counts. Every load is compared with the
saved weights (untimed).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bench_checkpoint import describe_run
from bench.bench_distributed import seaweedfs_bucket

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _lightning_checkpoint(size_bytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Lightning checkpoint dict of a ``size_bytes``-weights model after one Adam step, and its weights."""
    import lightning as L
    import torch

    width = 1024
    layers = max(1, size_bytes // (width * width * 4))

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"layers": layers, "width": width})
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def training_step(self, batch: Any, index: int) -> Any:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, width)), batch_size=4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    model = Model()
    trainer.fit(model, data)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    return checkpoint, {k: v.clone() for k, v in checkpoint["state_dict"].items()}


def bench_lightning(endpoint: str, bucket: str, size_bytes: int, repeat: int) -> list[tuple[str, float, float]]:
    import torch
    from s3torchconnector import S3ClientConfig
    from s3torchconnector.lightning import S3LightningCheckpoint

    from cloudckpt.lightning import CloudCheckpointIO

    checkpoint, weights = _lightning_checkpoint(size_bytes)
    paths: dict[str, Any] = {
        "cloudckpt CloudCheckpointIO": CloudCheckpointIO(),
        "s3torchconnector S3LightningCheckpoint": S3LightningCheckpoint(
            region="us-east-1", endpoint=endpoint, s3client_config=S3ClientConfig(force_path_style=True)),
    }
    times: dict[str, tuple[float, float]] = {}
    for run in range(repeat):
        for name, io in paths.items():
            url = f"s3://{bucket}/lightning/{name.split()[0]}/run{run}/epoch=0-step=1.ckpt"
            save = _timed(functools.partial(io.save_checkpoint, checkpoint, url))
            loaded: list[dict[str, Any]] = []
            load = _timed(functools.partial(_append, loaded, io.load_checkpoint, url))
            for key, value in weights.items():
                assert torch.equal(loaded[0]["state_dict"][key], value), (name, key)
            _keep_best(times, name, save, load, f"lightning run {run}")
    return [(name, *times[name]) for name in paths]


def _append(out: list[Any], fn: Callable[[str], Any], url: str) -> None:
    out.append(fn(url))


def _keep_best(times: dict[str, tuple[float, float]], name: str, save: float, load: float, run: str) -> None:
    best = times.get(name, (save, load))
    times[name] = (min(best[0], save), min(best[1], load))
    print(f"{run}: {name}: save {save:.2f} s, load {load:.2f} s", flush=True)


def _gpt2(size_bytes: int) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    width = 512
    layers = max(1, size_bytes // (12 * width * width * 4))
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=8, vocab_size=4096, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _hf_trainer(cls: Any, out: str, size_bytes: int, **kwargs: Any) -> Any:
    import torch
    from transformers import TrainingArguments

    tokens = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    args = TrainingArguments(output_dir=out, max_steps=1, save_strategy="no", per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100)
    trainer = cls(model=_gpt2(size_bytes), args=args, train_dataset=dataset, **kwargs)
    trainer.train()
    return trainer


def bench_hf(endpoint: str, bucket: str, size_bytes: int, repeat: int, work: Path) -> list[tuple[str, float, float]]:
    import boto3
    import torch
    from transformers import Trainer

    from cloudckpt.hf import CloudTrainer

    client = boto3.client("s3", endpoint_url=endpoint)
    times: dict[str, tuple[float, float]] = {}
    ours_name, peer_name = "cloudckpt CloudTrainer", "Trainer local save + boto3 upload_file"
    for run in range(repeat):
        ours = _hf_trainer(CloudTrainer, str(work / "ours"), size_bytes, checkpoint_dir=f"s3://{bucket}/hf/run{run}")
        weights = {k: v.clone() for k, v in ours.model.state_dict().items()}
        save = _timed(functools.partial(ours._save_checkpoint, ours.model, None))
        ours._resume = f"s3://{bucket}/hf/run{run}/checkpoint-1"
        load = _timed(functools.partial(_load_trainer, ours, "unused"))
        assert all(torch.equal(ours.model.state_dict()[k], v) for k, v in weights.items())
        _keep_best(times, ours_name, save, load, f"hf run {run}")

        peer = _hf_trainer(Trainer, str(work / f"peer{run}"), size_bytes)
        upload = _Upload(client, bucket, f"hf-peer/run{run}/checkpoint-1", Path(peer.args.output_dir) / "checkpoint-1")
        save = _timed(functools.partial(upload.save, peer))
        shutil.rmtree(upload.local)  # a fresh machine resuming would not have it either
        load = _timed(functools.partial(upload.load, peer, work / f"restored{run}"))
        assert all(torch.equal(peer.model.state_dict()[k], v) for k, v in weights.items())
        _keep_best(times, peer_name, save, load, f"hf run {run}")
    return [(ours_name, *times[ours_name]), (peer_name, *times[peer_name])]


def _load_trainer(trainer: Any, directory: str) -> None:
    """What ``Trainer.train`` loads on resume: weights, optimizer and scheduler, RNG states."""
    trainer._load_from_checkpoint(directory)
    trainer._load_optimizer_and_scheduler(directory)
    trainer._load_rng_state(directory)


class _Upload:
    """The peer: the Trainer's own local checkpoint directory, copied to and from the bucket with boto3."""

    def __init__(self, client: Any, bucket: str, prefix: str, local: Path) -> None:
        self.client, self.bucket, self.prefix, self.local = client, bucket, prefix, local

    def save(self, trainer: Any) -> None:
        trainer._save_checkpoint(trainer.model, None)
        for file in sorted(self.local.iterdir()):
            self.client.upload_file(str(file), self.bucket, f"{self.prefix}/{file.name}")

    def load(self, trainer: Any, restored: Path) -> None:
        restored.mkdir()
        for item in self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/")["Contents"]:
            self.client.download_file(self.bucket, item["Key"], str(restored / item["Key"].rsplit("/", 1)[1]))
        _load_trainer(trainer, str(restored))


def table(title: str, rows: list[tuple[str, float, float]]) -> str:
    ours_save, ours_load = rows[0][1], rows[0][2]
    lines = [f"{title}", "| path | save s | load s | save: peer / cloudckpt | load: peer / cloudckpt |",
             "|---|---:|---:|---:|---:|"]
    for name, save, load in rows:
        lines.append(f"| {name} | {save:.2f} | {load:.2f} | {save / ours_save:.2f}x | {load / ours_load:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench frameworks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="model weights, float32 (default 256)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 MiB, one run")
    parser.add_argument("--repeat", type=int, default=2, help="runs per path; the best counts (default 2)")
    args = parser.parse_args(argv)
    size = (16 if args.quick else args.size_mib) * MiB
    repeat = 1 if args.quick else args.repeat
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(describe_run(), flush=True)
    with seaweedfs_bucket("frameworks") as (endpoint, bucket), \
            tempfile.TemporaryDirectory(prefix="cloudckpt-bench-frameworks-", dir=REPO) as tmp:
        lightning_rows = bench_lightning(endpoint, bucket, size, repeat)
        hf_rows = bench_hf(endpoint, bucket, size, repeat, Path(tmp))
    print()
    print(f"model weights ~{size // MiB} MiB float32 (+ Adam state), best of {repeat}, {os.cpu_count()} cores, "
          f"SeaweedFS on 127.0.0.1")
    print(table("Lightning CheckpointIO", lightning_rows))
    print()
    print(table("Hugging Face Trainer checkpoint", hf_rows))
    print(f"{describe_run()} (at the end)")
    return 0
