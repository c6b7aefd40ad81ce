"""Every entry point that takes a URL refuses the same typos, through the one resolution.

``s3:/bucket/run`` (one slash) once went to a local directory called ``s3:`` through every
entry point that resolved a *directory* (the manager, ``latest_checkpoint``, the CLI's
``ls``/``verify``/``gc``/``cp``): the registry made the text an absolute path before the
URL parser saw it. Each case here checks the refusal names the text and nothing was written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloudckpt import Checkpoint, CheckpointManager, latest_checkpoint
from cloudckpt.errors import InvalidURLError
from cloudckpt.storage import resolve_directory, storage_for_directory

REPO = Path(__file__).resolve().parent.parent
TYPOS = ["s3:/bucket/run", "gs:/bucket/run", "S3:/Bucket/run", "s3:bucket/run", "s3:///run"]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: where a typo used to create ``./s3:``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("text", TYPOS)
def test_the_library_directory_entry_points_refuse_typos(text: str, workdir: Path) -> None:
    for refuse in (storage_for_directory, resolve_directory, latest_checkpoint,
                   lambda t: CheckpointManager(Checkpoint(w=np.zeros(3)), t, max_to_keep=2).save()):
        with pytest.raises(InvalidURLError) as info:
            refuse(text)
        assert text in str(info.value)
    with pytest.raises(InvalidURLError, match="missing"):  # pathlib turns s3://bucket into s3:/bucket
        latest_checkpoint(Path("s3://bucket/run"))
    assert list(workdir.iterdir()) == []


def test_the_documented_local_spelling_still_works(workdir: Path) -> None:
    manager = CheckpointManager(Checkpoint(w=np.ones(3)), "./s3:/bucket/run", max_to_keep=2)
    assert manager.save() == os.path.join("./s3:/bucket/run", "ckpt-1")
    assert latest_checkpoint("./s3:/bucket/run") == os.path.join("./s3:/bucket/run", "ckpt-1")
    assert (workdir / "s3:" / "bucket" / "run" / "ckpt-1.index").exists()


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cloudckpt", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def assert_refused(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("cloudckpt: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in errors[0] and "missing a slash" in errors[0], errors[0]
    assert "no checkpoints under" not in result.stderr


def test_the_cli_refuses_typos_in_every_command(workdir: Path) -> None:
    source = workdir / "src"
    w = np.arange(4.0)
    CheckpointManager(Checkpoint(w=w), source, max_to_keep=2).save()
    before = sorted(p.name for p in workdir.iterdir())
    for command in (["ls"], ["verify"], ["gc"], ["gc", "--yes"], ["inspect"]):
        assert_refused(cli(workdir, *command, "s3:/bucket/run"), "s3:/bucket/run")
    assert_refused(cli(workdir, "cp", str(source), "s3:/bucket/dst"), "s3:/bucket/dst")
    assert_refused(cli(workdir, "cp", str(source / "ckpt-1"), "s3:/bucket/dst/"), "s3:/bucket/dst")
    assert_refused(cli(workdir, "cp", str(source / "ckpt-1"), "s3:/bucket/dst/ckpt-9"), "s3:/bucket/dst/ckpt-9")
    assert_refused(cli(workdir, "cp", "s3:/bucket/run", str(workdir / "copy")), "s3:/bucket/run")
    assert_refused(cli(workdir, "export", "s3:/bucket/run/ckpt-1", str(workdir / "out.npz")), "s3:/bucket/run")
    assert sorted(p.name for p in workdir.iterdir()) == before  # no ./s3: directory, no copy
