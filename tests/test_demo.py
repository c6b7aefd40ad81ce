"""The README's main job, end to end: a real SIGKILL mid-run, a resume, identical final weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_survives_sigkill_and_resumes_bit_identical(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cloudckpt.demo", str(tmp_path / "ckpts"), "--steps", "60",
         "--save-every", "10", "--kill-at", "35"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exit code -9" in result.stdout
    assert "resumed from" in result.stdout and "ckpt-30 at step 30" in result.stdout
    assert "bit-identical" in result.stdout
