"""docs/integrations.md's Lightning recipe, run as written (on a local directory instead of a bucket)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"


def recipe(name: str, ckpt_dir: str) -> str:
    """The ```python block of docs/integrations.md marked ``# recipe: <name>``, its ``CKPT_DIR`` set to ``ckpt_dir``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    block = next(b for b in blocks if b.startswith(f"# recipe: {name}\n"))
    code, count = re.subn(r'^CKPT_DIR = ".*"$', f"CKPT_DIR = {ckpt_dir!r}", block, flags=re.M)
    assert count == 1, f"recipe {name} sets CKPT_DIR once"
    return code


def test_the_lightning_recipe_saves_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(recipe("lightning", str(tmp_path / "run")), "docs/integrations.md", "exec"), namespace)
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.suffix == ".index")
    assert names == ["epoch=2-step=6.ckpt.index", "epoch=3-step=8.ckpt.index", "last.ckpt.index"]
