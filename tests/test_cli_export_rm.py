"""``cloudckpt export`` of a damaged checkpoint, and ``cloudckpt rm`` / ``remove_checkpoint``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import storage_of

from cloudckpt import Checkpoint, CheckpointManager, Variable, latest_checkpoint, remove_checkpoint
from cloudckpt.cli import main as cli_main
from cloudckpt.cli.common import EXIT_NOT_FOUND
from cloudckpt.errors import CheckpointNotFoundError, CheckpointVersionError
from cloudckpt.format.index_fetch import load_index
from cloudckpt.format.state_file import STATE_KEY, format_state, parse
from cloudckpt.manager import remove as remove_module
from cloudckpt.storage import resolve


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


# ---------------------------------------------------------------------------- rm
def incremental_run(root: str) -> list[str]:
    """ckpt-1..3 by a manager: a constant array (stored once, in ckpt-1's object) and a changing one."""
    frozen = Variable(np.arange(4096, dtype=np.float32))
    step = Variable(np.zeros(8))
    manager = CheckpointManager(Checkpoint(frozen=frozen, step=step), root, max_to_keep=5)
    paths = []
    for k in range(3):
        step.assign(np.full(8, float(k)))
        paths.append(manager.save())
    return paths


def objects_of(root: str, name: str) -> list[str]:
    location = resolve(f"{root}/{name}")
    index = load_index(location.storage, location.name)
    return [o.name for o in index.objects]


def test_remove_checkpoint_keeps_what_others_name_and_updates_the_state_file(root: str) -> None:
    paths = incremental_run(root)
    storage = storage_of(root)
    first_objects = objects_of(root, "ckpt-1")
    named_by_later = set(objects_of(root, "ckpt-2")) | set(objects_of(root, "ckpt-3"))
    shared = [o for o in first_objects if o in named_by_later]
    assert shared, "the constant array should be referenced by the later checkpoints"

    removed = remove_checkpoint(paths[0])
    keys = {m.key for m in storage.list()}
    assert "ckpt-1.index" not in keys
    assert set(shared) <= keys and not (set(first_objects) - set(shared)) & keys
    assert (removed.deleted, removed.kept) == (tuple(sorted(set(first_objects) - set(shared))), tuple(sorted(shared)))
    state = parse(storage.get(STATE_KEY).decode(), "state")
    assert state.all_model_checkpoint_paths == ["ckpt-2", "ckpt-3"] and state.model_checkpoint_path == "ckpt-3"
    assert len(state.all_model_checkpoint_timestamps) == 2 and state.deleting == []

    own = sorted(set(objects_of(root, "ckpt-3")) - set(objects_of(root, "ckpt-2")))
    removed = remove_checkpoint(paths[2])  # the latest: the state file then points at the one before it
    assert own and removed.deleted == tuple(own) and not set(own) & {m.key for m in storage.list()}
    assert removed.latest == "ckpt-2" and removed.state_updated
    state = parse(storage.get(STATE_KEY).decode(), "state")
    assert state.all_model_checkpoint_paths == ["ckpt-2"] and state.model_checkpoint_path == "ckpt-2"
    assert latest_checkpoint(root) == paths[1]
    frozen, step = Variable(np.zeros(4096, dtype=np.float32)), Variable(np.zeros(8))
    manager = CheckpointManager(Checkpoint(frozen=frozen, step=step), root, max_to_keep=5)
    assert manager.restore_or_initialize() == paths[1]  # its shared bytes survived both removals
    assert np.array_equal(frozen.numpy(), np.arange(4096, dtype=np.float32)) and step.numpy()[0] == 1.0
    assert manager.save() == f"{root}/ckpt-3"  # resumed at save_counter 2: the freed number is reused


def test_remove_checkpoint_retries_its_compare_and_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer replaces the state file between rm's read and write: rm's write is refused,
    it reads again and keeps the other writer's change."""
    root = str(tmp_path / "run")
    paths = incremental_run(root)
    storage = storage_of(root)
    real_read = remove_module.read_state
    raced = []

    def read_then_race(store: Any) -> Any:
        found = real_read(store)
        if not raced:
            raced.append(1)
            state = parse(storage.get(STATE_KEY).decode(), "state")
            state.metrics["ckpt-3"] = 0.5  # the other writer's change
            storage.put(STATE_KEY, format_state(state).encode())
        return found

    monkeypatch.setattr(remove_module, "read_state", read_then_race)
    remove_checkpoint(paths[1])
    state = parse(storage.get(STATE_KEY).decode(), "state")
    assert raced and state.all_model_checkpoint_paths == ["ckpt-1", "ckpt-3"] and state.metrics == {"ckpt-3": 0.5}


def test_remove_refuses_what_it_must_not_touch(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    incremental_run(root)
    storage = storage_of(root)
    before = {m.key: storage.get(m.key) for m in storage.list()}
    with pytest.raises(CheckpointNotFoundError, match="ckpt-9"):
        remove_checkpoint(f"{root}/ckpt-9")
    raw = json.loads(storage.get("ckpt-2.index"))
    raw["version"] = 99
    storage.put("ckpt-2.index", json.dumps(raw).encode())
    before["ckpt-2.index"] = storage.get("ckpt-2.index")
    with pytest.raises(CheckpointVersionError):
        remove_checkpoint(f"{root}/ckpt-2")
    assert {m.key: storage.get(m.key) for m in storage.list()} == before  # nothing changed


def test_cli_rm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "run")
    paths = incremental_run(root)
    assert cli_main(["rm", paths[0]]) == 0
    out = capsys.readouterr().out
    assert "removed " + paths[0] in out and "kept" in out and "named by other checkpoints" in out
    assert latest_checkpoint(root) == paths[2]
    assert cli_main(["rm", paths[0]]) == EXIT_NOT_FOUND
    assert "ckpt-1" in capsys.readouterr().err
