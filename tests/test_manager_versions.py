"""A checkpoint of a newer format version is not damaged: the manager stops, and touches nothing.

A newer cloudckpt owns a directory holding its checkpoints: resuming past one (as if it were
damaged) would throw away its training, and saving would rewrite its state file, replace its
index and evict its checkpoints. Each test snapshots the directory and checks nothing changed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import storage_of

from cloudckpt import Checkpoint, CheckpointManager, latest_checkpoint
from cloudckpt.errors import CheckpointVersionError, ConcurrentWriterError
from cloudckpt.format import FORMAT_VERSION, index_key
from cloudckpt.manager.directory import delete_checkpoint
from cloudckpt.storage import Storage, join_url

#: A format version this cloudckpt does not know yet (the next one).
NEWER = FORMAT_VERSION + 1


def make_run(root: str, version: object = NEWER) -> np.ndarray:
    """ckpt-1..3 saved, then ckpt-3's index rewritten with format ``version``; returns the live array."""
    w = np.zeros(64)
    manager = CheckpointManager(Checkpoint(w=w), root, max_to_keep=3)
    for n in (1, 2, 3):
        w[:] = n
        manager.save()
    storage = storage_of(root)
    doc = json.loads(storage.get(index_key("ckpt-3")))
    doc["version"] = version
    storage.put(index_key("ckpt-3"), json.dumps(doc).encode())
    w[:] = -1
    return w


def snapshot(storage: Storage) -> dict[str, bytes]:
    return {meta.key: storage.get(meta.key) for meta in storage.list()}


def test_resume_stops_at_a_newer_checkpoint_and_the_manager_will_not_save(root: str) -> None:
    w = make_run(root)
    storage = storage_of(root)
    before = snapshot(storage)
    with pytest.raises(CheckpointVersionError) as plain:
        Checkpoint(w=w).restore(join_url(root, "ckpt-3"))
    manager = CheckpointManager(Checkpoint(w=w), root, max_to_keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "damaged or incomplete" fallback
        with pytest.raises(CheckpointVersionError, match=rf"format version {NEWER}.*upgrade cloudckpt") as resumed:
            manager.restore_or_initialize()
    assert str(resumed.value) == str(plain.value)  # the same error a plain restore gives
    assert (w == -1).all()  # nothing restored from an older checkpoint
    for _ in range(2):  # refused, and refused again (not a one-off)
        with pytest.raises(ConcurrentWriterError, match=rf"ckpt-3.*format version {NEWER}.*upgrade cloudckpt"):
            manager.save()
    assert snapshot(storage) == before


@pytest.mark.parametrize("max_to_keep", [1, 3])
def test_a_save_without_a_resume_refuses_a_directory_with_a_newer_checkpoint(tmp_path: Path,
                                                                              max_to_keep: int) -> None:
    w = make_run(str(tmp_path))
    storage = storage_of(str(tmp_path))
    before = snapshot(storage)
    manager = CheckpointManager(Checkpoint(w=w), tmp_path, max_to_keep=max_to_keep)
    with pytest.raises(ConcurrentWriterError, match="upgrade cloudckpt"):
        manager.save()
    assert snapshot(storage) == before
    assert latest_checkpoint(tmp_path) == join_url(str(tmp_path), "ckpt-3")  # committed, not damaged
    assert manager.latest_checkpoint == join_url(str(tmp_path), "ckpt-3")


def test_deleting_a_newer_checkpoint_keeps_it(tmp_path: Path) -> None:
    make_run(str(tmp_path))
    storage = storage_of(str(tmp_path))
    before = snapshot(storage)
    delete_checkpoint(storage, "ckpt-3")  # an eviction, or one a crashed eviction left to finish
    delete_checkpoint(storage, "ckpt-2")  # its data: a newer index may name it
    assert set(before) - set(snapshot(storage)) == {index_key("ckpt-2")}


@pytest.mark.parametrize("version", ["3", 0, None, True])
def test_a_garbled_version_is_damage_not_a_newer_format(tmp_path: Path, version: object) -> None:
    w = make_run(str(tmp_path), version)
    manager = CheckpointManager(Checkpoint(w=w), tmp_path, max_to_keep=3)
    with pytest.warns(RuntimeWarning, match="ckpt-3 is damaged or incomplete"):
        assert manager.restore_or_initialize() == join_url(str(tmp_path), "ckpt-2")
    assert (w == 2).all()
    assert manager.save() == join_url(str(tmp_path), "ckpt-3")
