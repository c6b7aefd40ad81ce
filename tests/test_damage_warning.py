"""A resume that falls back past a damaged checkpoint says so once, not twice (log + warning)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import glob, sys
import numpy as np
import cloudckpt

directory = sys.argv[1]
v = cloudckpt.Variable(np.arange(10.0))
manager = cloudckpt.CheckpointManager(cloudckpt.Checkpoint(v=v), directory, max_to_keep=3)
manager.save()
v.assign(v.numpy() + 1)
manager.save()
data = glob.glob(directory + "/ckpt-2.data-*")[0]
raw = bytearray(open(data, "rb").read())
raw[10] ^= 1
open(data, "wb").write(bytes(raw))
fresh = cloudckpt.CheckpointManager(cloudckpt.Checkpoint(v=cloudckpt.Variable(np.zeros(10))), directory, max_to_keep=3)
print(fresh.restore_or_initialize())
"""


def test_the_damaged_checkpoint_warning_is_printed_once(tmp_path: Path) -> None:
    """Default Python settings: no logging configured (the last-resort handler prints warnings) and
    the default warnings filter - what a user running a training script sees on stderr."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip().endswith("ckpt-1")
    assert out.stderr.count("ckpt-2 is damaged or incomplete") == 1, out.stderr
