"""Hugging Face sharded safetensors export: ``cloudckpt export --format safetensors`` and ``export_hf``.

A tiny GPT-2 built from a config (nothing from a hub) saved on SeaweedFS in bfloat16 comes
back through ``safetensors.torch.load_file`` and ``from_pretrained`` with no missing or
unexpected keys, bit for bit; float8 stays float8; a checkpoint sharded over four simulated
hosts is exported by batches of ranged reads no larger than the batch bound.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cloudckpt
from cloudckpt.cli import main
from cloudckpt.distributed import DTensorCheckpoint, Layout, Mesh, ShardedArray
from cloudckpt.testing.threads import ThreadCoordinator, ThreadGroup
from cloudckpt.tools.export import NothingToExportError
from cloudckpt.tools.export_hf import INDEX_FILE, export_hf, hf_name, plan_shards

os.environ["HF_HUB_OFFLINE"] = "1"
#: The module (``cloudckpt.tools.export`` the attribute is the function of that name).
export_module = importlib.import_module("cloudckpt.tools.export")


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' stub


def _load_shards(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / INDEX_FILE).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(directory / shard))
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def test_gpt2_saved_on_s3_exports_to_shards_that_from_pretrained_loads(s3_root: str, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model = _tiny_gpt2()
    url = f"{s3_root}/hf/ckpt-1"
    cloudckpt.Checkpoint(model=model, step=cloudckpt.Variable(3)).write(url)
    out = tmp_path / "hf"
    assert main(["export", "--format", "safetensors", "--prefix", "model/", "--strip-prefix",
                 "--max-shard-size", "64KiB", url, str(out)]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = _load_shards(out)
    expected = model.state_dict()
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == torch.bfloat16 for k, v in expected.items())

    model.config.save_pretrained(out)
    result: Any = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True, dtype=torch.bfloat16)
    loaded, info = result  # a (model, loading info) pair with output_loading_info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())

    # without --strip-prefix the names keep it; a second export into the same directory needs --force
    assert main(["export", "--format", "safetensors", "--prefix", "model/", url, str(out)]) != 0
    report = export_hf(url, out, prefix="model/", force=True)
    assert report.shards == ("model-00001-of-00001.safetensors",)
    assert sorted(p.name for p in out.glob("model-*")) == list(report.shards)  # the older shards are gone
    assert "model.transformer.wte.weight" in _load_shards(out)


def test_float8_int_keys_and_names(tmp_path: Path) -> None:
    state: dict[str, Any] = {"w8": torch.randn(4, 4).to(torch.float8_e4m3fn),
                             "w5": torch.randn(3).to(torch.float8_e5m2), "opt": {0: {"exp_avg": torch.arange(3.0)}},
                             "a/b": torch.ones(2), "lr": 0.1}
    cloudckpt.Checkpoint(state=state).write(str(tmp_path / "ck"))
    report = export_hf(str(tmp_path / "ck"), tmp_path / "out", prefix="state/", strip_prefix=True)
    tensors = _load_shards(tmp_path / "out")
    assert sorted(tensors) == ["a/b", "opt.0.exp_avg", "w5", "w8"] and report.skipped == ("state/lr",)
    assert tensors["w8"].dtype == torch.float8_e4m3fn and torch.equal(tensors["w8"].view(torch.uint8),
                                                                      state["w8"].view(torch.uint8))
    assert tensors["w5"].dtype == torch.float8_e5m2
    with pytest.raises(NothingToExportError, match="nothing/"):
        export_hf(str(tmp_path / "ck"), tmp_path / "none", prefix="nothing/")
    assert hf_name("model/layers~1x/#3", "model/", True) == "layers/x.3"

    class Sized:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = nbytes

    sizes = [[t.nbytes for t in shard] for shard in plan_shards([Sized(n) for n in (4, 4, 9, 1, 2)], 8)]
    assert sizes == [[4, 4], [9], [1, 2]]


def test_a_checkpoint_sharded_over_hosts_exports_in_bounded_batches(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    weights = {f"layer{i}": rng.standard_normal((8, 16)).astype(ml_dtypes.bfloat16) for i in range(6)}
    path = str(tmp_path / "sharded" / "ck")

    def host(coordinator: ThreadCoordinator) -> None:
        mesh = Mesh(["x"], [4], coordinator=coordinator)
        state = {k: ShardedArray.from_global(v, Layout(["x", "unsharded"], mesh)) for k, v in weights.items()}
        DTensorCheckpoint(mesh, model=state).write(path)

    for outcome in ThreadGroup(4).run(host):
        assert outcome.error is None, outcome.error
    index = cloudckpt.CheckpointReader(path)
    assert index.get_variable_to_shape_map()["model/layer0"] == [8, 16]

    batches: list[int] = []
    real = export_module.read_arrays

    def counting(storage: Any, index: Any, targets: Any) -> None:
        batches.append(sum(t.dest.nbytes for t in targets))
        real(storage, index, targets)

    monkeypatch.setattr(export_module, "BATCH_BYTES", 2 * 8 * 16 * 2)  # two tensors
    monkeypatch.setattr(export_module, "read_arrays", counting)
    export_hf(path, tmp_path / "out", prefix="model/", strip_prefix=True, max_shard_size=3 * 8 * 16 * 2)
    tensors = _load_shards(tmp_path / "out")
    assert len(list((tmp_path / "out").glob("model-*"))) == 2
    assert batches and max(batches) <= 2 * 8 * 16 * 2 and sum(batches) == 6 * 8 * 16 * 2
    for name, value in weights.items():
        assert np.array_equal(tensors[name].view(torch.uint16).numpy(), value.view(np.uint16)), name


def test_a_torch_dcp_checkpoint_exports_by_its_fqns(tmp_path: Path) -> None:
    """What TorchTitan and FSDP2 users have: torch's own DCP layout, read through the registered reader."""
    from torch.distributed.checkpoint.state_dict_saver import save

    model = {"w": torch.randn(4, 4).to(torch.bfloat16), "b": torch.ones(4)}
    with pytest.warns(UserWarning, match="single process"):
        save({"model": model, "step": 3}, checkpoint_id=str(tmp_path / "dcp"))
    report = export_hf(str(tmp_path / "dcp"), tmp_path / "out", prefix="model.", strip_prefix=True)
    tensors = _load_shards(tmp_path / "out")
    assert report.tensors == 2 and sorted(tensors) == ["b", "w"]
    assert tensors["w"].dtype == torch.bfloat16 and torch.equal(tensors["w"], model["w"])
