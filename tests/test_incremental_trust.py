"""Incremental saves never commit a reference they have no reason to trust (issue 22, items 1-3 and 9).

- a checkpoint a resume fell back past is never a base (a deterministic step recreates its bytes);
- a referenced object that is gone (or resized) is uploaded again, and one that vanishes while a
  save runs stops the commit - on the plain pipeline and the DCP writer alike (one commit path);
- a base index cannot make a new checkpoint restore bytes other than the live ones: reuse needs
  an equal CRC32C too, the new record holds the live bytes' checksums, and sizes are listed;
- an object mostly stale is not referenced: its live pieces are uploaded again so it can go.

Bytes uploaded are counted at the storage layer (``Storage.put`` of data objects).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import storage_of
from test_incremental import UploadCounter

from cloudckpt import Checkpoint, CheckpointManager, Variable
from cloudckpt.cli.verify import verify_checkpoint
from cloudckpt.errors import ChecksumError, SaveError
from cloudckpt.format import index_key
from cloudckpt.format.content_hash import content_hash
from cloudckpt.format.index_fetch import load_index
from cloudckpt.saving.objects import MIN_REFERENCED_FRACTION
from cloudckpt.storage import Storage, join_url
from cloudckpt.storage.checksum import crc32c_of


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> UploadCounter:
    return UploadCounter(monkeypatch)


FROZEN = 50_000  # float64 elements: 400 kB that never change
HEAD = 64


def _state() -> dict[str, Any]:
    return {"frozen": np.zeros(FROZEN), "head": np.zeros(HEAD), "step": Variable(0)}


def _step(state: dict[str, Any], n: int) -> None:
    """A deterministic training step: the same ``n`` always gives the same bytes."""
    state["frozen"][:] = np.arange(FROZEN, dtype=np.float64)
    state["head"][:] = np.sin(np.arange(HEAD) + n)
    state["step"].assign(n)


def _assert_restores(root: str, name: str, expected: dict[str, Any]) -> None:
    restored = _state()
    Checkpoint(**restored).restore(join_url(root, name)).assert_consumed()
    np.testing.assert_array_equal(restored["frozen"], expected["frozen"])
    np.testing.assert_array_equal(restored["head"], expected["head"])
    assert int(restored["step"]) == int(expected["step"])


def _flip_byte(storage: Storage, key: str) -> None:
    data = bytearray(storage.get(key))
    data[0] ^= 0x01
    storage.put(key, bytes(data))


def _data_bytes(storage: Storage) -> int:
    return sum(m.size for m in storage.list("") if ".data-" in m.key)


def _reused_from_ckpt_1(storage: Storage) -> list[str]:
    """The data objects ckpt-2 names that ckpt-1's save wrote (what an incremental ckpt-2 reuses)."""
    return [o.name for o in load_index(storage, "ckpt-2").objects if o.name.startswith("ckpt-1.")]


def _managed_two_saves(root: str) -> tuple[dict[str, Any], CheckpointManager]:
    """Steps 1 and 2 saved by one manager keeping everything: ckpt-2 reuses ckpt-1's frozen bytes."""
    state = _state()
    manager = CheckpointManager(Checkpoint(**state), root, max_to_keep=None)
    for n in (1, 2):
        _step(state, n)
        manager.save()
    return state, manager


# ---------------------------------------------------------------------------- item 1
def test_a_save_after_falling_back_past_a_damaged_checkpoint_stores_intact_bytes(root: str) -> None:
    """Fall back past a damaged ckpt-2, redo the same step, save: the new ckpt-2 must not inherit the
    damaged bytes (it has the same content hash) - it restores and verifies."""
    state = _state()
    manager = CheckpointManager(Checkpoint(**state), root, max_to_keep=3)
    for n in (1, 2):
        _step(state, n)
        manager.save()
    storage = storage_of(root)
    damaged = [o.name for o in load_index(storage, "ckpt-2").owned_objects()]
    assert damaged
    _flip_byte(storage, damaged[0])

    live = _state()
    resumed = CheckpointManager(Checkpoint(**live), root, max_to_keep=3)
    with pytest.warns(RuntimeWarning, match="ckpt-2 is damaged"):
        assert resumed.restore_or_initialize() == join_url(root, "ckpt-1")
    _step(live, 2)  # the same step again: exactly the bytes the damaged checkpoint holds
    assert resumed.save() == join_url(root, "ckpt-2")
    assert not set(damaged) & {o.name for o in load_index(storage, "ckpt-2").objects}
    _assert_restores(root, "ckpt-2", live)
    assert verify_checkpoint(storage, "ckpt-2", show_progress=False).problems == []
    _step(live, 3)
    resumed.save()  # and the chain goes on from the intact one
    _assert_restores(root, "ckpt-3", live)
    assert verify_checkpoint(storage, "ckpt-3", show_progress=False).problems == []


# ---------------------------------------------------------------------------- item 2
def test_a_referenced_object_that_is_gone_is_uploaded_again(root: str, uploads: UploadCounter,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    state, manager = _managed_two_saves(root)
    storage = storage_of(root)
    shared = _reused_from_ckpt_1(storage)
    assert shared
    storage.delete(shared)  # a lifecycle rule, someone cleaning up
    uploads.take()
    _step(state, 3)
    with caplog.at_level(logging.WARNING, logger="cloudckpt.saving"):
        manager.save()
    assert "gone" in caplog.text and shared[0] in caplog.text
    assert uploads.take() >= state["frozen"].nbytes
    assert not set(shared) & {o.name for o in load_index(storage, "ckpt-3").objects}
    _assert_restores(root, "ckpt-3", state)
    _step(state, 4)
    manager.save()  # the frozen bytes are referenced again - where ckpt-3 put them
    assert uploads.take() < 1024
    _assert_restores(root, "ckpt-4", state)


def test_an_object_that_vanishes_while_a_save_runs_is_never_committed(root: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudckpt.saving import pipeline

    state, manager = _managed_two_saves(root)
    storage = storage_of(root)
    shared = _reused_from_ckpt_1(storage)
    real = pipeline.crash_point

    def vanish(point: str) -> None:
        if point == "after_data_upload":
            storage.delete(shared)  # after the save listed its base, before it commits
        real(point)

    monkeypatch.setattr(pipeline, "crash_point", vanish)
    _step(state, 3)
    with pytest.raises(SaveError, match="gone") as info:
        manager.save()
    assert shared[0] in str(info.value)
    monkeypatch.setattr(pipeline, "crash_point", real)
    assert not storage.exists(index_key("ckpt-3"))
    assert [m.key for m in storage.list("ckpt-3.")] == []  # its own data removed too
    path = manager.save()  # the next save uploads the pieces again
    assert path is not None
    _assert_restores(root, path.rsplit("/", 1)[-1], state)


def test_the_dcp_writer_checks_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP's writer reuses through the same base and commits through the same step."""
    import torch

    from cloudckpt.coordination import LocalCoordinator
    from cloudckpt.dcp import DCPCheckpoint
    from cloudckpt.dcp import writer as dcp_writer

    app = {"frozen": torch.arange(float(FROZEN)), "head": torch.zeros(HEAD)}
    manager = CheckpointManager(DCPCheckpoint(app, coordinator=LocalCoordinator()), tmp_path, max_to_keep=None)
    manager.save()
    app["head"] += 1
    manager.save()
    storage = storage_of(str(tmp_path))
    shared = _reused_from_ckpt_1(storage)
    assert shared
    storage.delete(shared)
    app["head"] += 1
    manager.save()  # gone before the save: uploaded again
    index = load_index(storage, "ckpt-3")
    assert not index.references
    real = dcp_writer.crash_point
    later = [o.name for o in index.objects]

    def vanish(point: str) -> None:
        if point == "after_data_upload":
            storage.delete(later)
        real(point)

    monkeypatch.setattr(dcp_writer, "crash_point", vanish)
    app["head"] += 1
    with pytest.raises(Exception, match="gone"):
        manager.save()
    assert not storage.exists(index_key("ckpt-4"))


# ---------------------------------------------------------------------------- item 3
def _rewrite_chunk(root: Path, name: str, key: str, **fields: Any) -> None:
    path = root / index_key(name)
    doc = json.loads(path.read_text())
    doc["entries"][key]["chunks"][0].update(fields)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("lie", ["hash", "hash and crc32c", "hash, crc32c and object size"])
def test_a_base_index_cannot_make_a_checkpoint_restore_other_bytes(tmp_path: Path, lie: str) -> None:
    """The base index says its old bytes are the new ones: the new checkpoint restores the new
    bytes, or fails loudly - never the old ones."""
    old, new = np.arange(1000.0), np.arange(1000.0) + 1
    live = {"a": old.copy(), "b": np.zeros(10)}
    manager = CheckpointManager(Checkpoint(**live), tmp_path, max_to_keep=None)
    manager.save()
    fields: dict[str, Any] = {"hash": content_hash([memoryview(new.tobytes())])}
    if "crc32c" in lie:
        fields["crc32c"] = crc32c_of([new.tobytes()])
    _rewrite_chunk(tmp_path, "ckpt-1", "a", **fields)
    if "size" in lie:
        doc = json.loads((tmp_path / "ckpt-1.index").read_text())
        doc["objects"][0]["size"] += 8
        (tmp_path / "ckpt-1.index").write_text(json.dumps(doc))
    live["a"][:] = new
    manager.save()
    restored = {"a": np.zeros(1000), "b": np.zeros(10)}
    try:
        Checkpoint(**restored).restore(join_url(str(tmp_path), "ckpt-2")).assert_consumed()
    except ChecksumError:
        assert lie == "hash and crc32c"  # stored bytes that match no recorded CRC of the live ones
        return
    np.testing.assert_array_equal(restored["a"], new)


# ---------------------------------------------------------------------------- item 9
def test_a_few_unchanged_bytes_do_not_keep_an_old_object_alive(tmp_path: Path, uploads: UploadCounter) -> None:
    """The issue's example: a 4 MB model that changes every save and an 80-byte constant; with
    max_to_keep=2, the directory holds two full copies, not three."""
    model, constant = np.zeros(500_000), np.arange(10.0)
    manager = CheckpointManager(Checkpoint(model=model, constant=constant), tmp_path, max_to_keep=2)
    storage = storage_of(str(tmp_path))
    one_copy = model.nbytes + constant.nbytes + 8
    for n in range(1, 11):
        model[:] = n
        manager.save()
        assert uploads.take() == one_copy  # the constant goes up again with the model
        assert _data_bytes(storage) <= min(n, 2) * one_copy
    for name in ("ckpt-9", "ckpt-10"):
        restored = {"model": np.zeros_like(model), "constant": np.zeros_like(constant)}
        Checkpoint(**restored).restore(join_url(str(tmp_path), name)).expect_partial()
        np.testing.assert_array_equal(restored["model"], model if name == "ckpt-10" else np.full_like(model, 9))
        np.testing.assert_array_equal(restored["constant"], constant)


@pytest.mark.parametrize("frozen_share", [MIN_REFERENCED_FRACTION + 0.05, MIN_REFERENCED_FRACTION - 0.05])
def test_unchanged_pieces_are_referenced_while_they_keep_a_quarter_of_their_object(
        tmp_path: Path, uploads: UploadCounter, frozen_share: float) -> None:
    total = 100_000
    frozen = np.arange(int(total * frozen_share), dtype=np.float64)
    trained = np.zeros(total - frozen.size)
    manager = CheckpointManager(Checkpoint(frozen=frozen, trained=trained), tmp_path, max_to_keep=2)
    manager.save()
    for n in range(2, 5):
        trained[:] = n
        uploads.take()
        manager.save()
        uploaded = uploads.take()
        if frozen_share >= MIN_REFERENCED_FRACTION:
            assert uploaded == trained.nbytes + 8  # the frozen part stays where the first save put it
        else:
            assert uploaded == frozen.nbytes + trained.nbytes + 8  # mostly stale: uploaded again
    storage = storage_of(str(tmp_path))
    index = load_index(storage, "ckpt-4")
    assert bool(index.references) == (frozen_share >= MIN_REFERENCED_FRACTION)
