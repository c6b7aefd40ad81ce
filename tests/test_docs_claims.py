"""What the docs state about installs and errors matches the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudckpt import Checkpoint, Variable
from cloudckpt.errors import CheckpointFormatError

ROOT = Path(__file__).resolve().parent.parent


def base_install_packages(storage_md: str) -> set[str]:
    """The packages docs/storage.md says ``pip install cloudckpt`` brings."""
    row = next(line for line in storage_md.splitlines() if line.startswith("| `pip install cloudckpt` |"))
    return {name.strip() for name in row.split("|")[2].split(",")}


def base_dependencies() -> set[str]:
    """The names in pyproject.toml's ``dependencies = [...]`` (tomllib is Python >= 3.11 only)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert block is not None
    return {re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0] for dep in re.findall(r'"([^"]+)"', block.group(1))}


def test_storage_docs_list_the_base_install_dependencies() -> None:
    assert base_install_packages((ROOT / "docs" / "storage.md").read_text()) == base_dependencies()


def test_docs_name_the_error_restoring_a_tensorflow_checkpoint_raises() -> None:
    """docs/tensorflow-import.md names the error ``Checkpoint.restore(tf_path)`` really raises."""
    with pytest.raises(CheckpointFormatError) as raised:
        Checkpoint(v=Variable(0.0)).restore(str(ROOT / "tests" / "tf_fixtures" / "data" / "basic" / "ckpt-1"))
    text = (ROOT / "docs" / "tensorflow-import.md").read_text()
    sentence = text[text.index("`Checkpoint.restore(tf_path)`"):][:400]
    assert type(raised.value).__name__ in sentence and "NotImplementedError` says so" not in sentence


def test_the_dcp_loop_starts_its_process_group_on_this_torch(tmp_path: Path) -> None:
    """docs/dcp.md's loop: its ``init_process_group`` line runs on the torch installed here (the CPU
    build has no nccl: ``"cpu:gloo,cuda:nccl"`` alone fails)."""
    import subprocess
    import sys

    text = (ROOT / "docs" / "dcp.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("dist.init_process_group("))
    call = line.split("  #")[0].replace("dist.init_process_group(", "dist.init_process_group(init_method="
                                        f"'file://{tmp_path}/store', rank=0, world_size=1, backend=", 1)
    code = f"import torch, torch.distributed as dist\n{call}\ndist.barrier()\ndist.destroy_process_group()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, line + "\n" + out.stderr[-2000:]
