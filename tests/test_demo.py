"""The README's main job, end to end: a real SIGKILL mid-run, a resume, identical final weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_survives_sigkill_and_resumes_bit_identical(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cloudckpt.demo", str(tmp_path / "ckpts"), "--steps", "60",
         "--save-every", "10", "--kill-at", "35"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exit code -9" in result.stdout
    assert "resumed from" in result.stdout and "ckpt-30 at step 30" in result.stdout
    assert "bit-identical" in result.stdout


def _demo(directory: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudckpt.demo", directory, "--steps", "40", "--save-every", "10", "--kill-at", "25"],
        capture_output=True, text=True, timeout=300, check=False)


def test_demo_run_twice_on_one_url_kills_and_resumes_each_time(tmp_path: Path) -> None:
    """A URL is never wiped: the second run must not resume the first run's finished checkpoints
    (which killed nothing and still claimed a crash), but start fresh under a prefix of its own."""
    url = (tmp_path / "bucket").as_uri()
    runs = [_demo(url), _demo(url)]
    for result in runs:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "exit code -9" in result.stdout
        assert "no checkpoint, starting fresh" in result.stdout
        assert "ckpt-20 at step 20" in result.stdout
    prefixes = sorted(p.name for p in (tmp_path / "bucket").iterdir())
    assert len(prefixes) == 2, prefixes  # one fresh prefix per run, nothing of the first overwritten


def test_demo_refuses_to_report_a_crash_it_did_not_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A worker that was never killed (it ended on its own) fails the demo: no 'killed ... bit-identical'."""
    from cloudckpt import demo

    monkeypatch.setattr(demo, "run_worker_until", lambda directory, args, kill_at: demo.WorkerRun(0, None))
    assert demo.main([str(tmp_path / "d"), "--steps", "10", "--save-every", "5", "--kill-at", "7"]) == 1
    out = capsys.readouterr()
    assert "bit-identical" not in out.out and "was not killed" in out.err
