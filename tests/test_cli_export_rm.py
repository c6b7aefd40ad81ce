"""``cloudckpt export`` of a damaged checkpoint, and ``cloudckpt rm`` / ``remove_checkpoint``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloudckpt import Checkpoint
from cloudckpt.cli import main as cli_main


def damaged_checkpoint(tmp_path: Path) -> str:
    path = Checkpoint(a=np.arange(100.0)).write(str(tmp_path / "ck"))
    data = next(tmp_path.glob("ck.data-*"))
    raw = bytearray(data.read_bytes())
    raw[10] ^= 1
    data.write_bytes(bytes(raw))
    return path


def test_export_of_a_damaged_checkpoint_speaks_of_the_export(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """No 'live object', 'restore' wording: an export restores nothing into anybody's objects."""
    path = damaged_checkpoint(tmp_path)
    out = tmp_path / "out.npz"
    assert cli_main(["export", path, str(out)]) != 0
    error = capsys.readouterr().err
    assert "checksum mismatch for 'a'" in error
    assert "live" not in error and "restore" not in error, error
    assert "nothing was written to" in error and "cloudckpt verify" in error, error
    assert not out.exists()
