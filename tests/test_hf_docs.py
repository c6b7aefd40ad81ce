"""docs/integrations.md's Hugging Face recipes (Trainer, Accelerate, safetensors export), run as written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_lightning_docs import recipe

os.environ["HF_HUB_OFFLINE"] = "1"


def _run(name: str, tmp_path: Path) -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(compile(recipe(name, str(tmp_path / "ckpts")), "docs/integrations.md", "exec"), namespace)
    return namespace


def test_the_trainer_recipe_saves_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _run("trainer", tmp_path)
    assert sorted(p.name for p in (tmp_path / "ckpts").glob("*.index")) == ["checkpoint-4.index",
                                                                            "checkpoint-6.index"]
    assert not list((tmp_path / "local-logs").glob("checkpoint-*")), "nothing checkpointed to local disk"


def test_the_accelerate_and_export_recipes_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _run("accelerate", tmp_path)
    assert (tmp_path / "ckpts" / "state-100.index").exists()
    _run("export", tmp_path)
    index = json.loads((tmp_path / "hf-model" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
