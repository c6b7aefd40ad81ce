"""CheckpointManager: TensorFlow's own manager tests, ported, on local disk, SeaweedFS and GCS."""

from __future__ import annotations

import os
import pathlib
import threading
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from cloudckpt import Checkpoint, CheckpointOptions, Variable
from cloudckpt.errors import ConcurrentWriterError
from cloudckpt.format import index_key
from cloudckpt.format.index_fetch import load_index
from cloudckpt.format.state_file import STATE_KEY, parse, read_state
from cloudckpt.manager import CheckpointManager, latest_checkpoint
from cloudckpt.manager.retention import BestN
from cloudckpt.storage import ByteRange, Location, ObjectMeta, ReadRequest, join_url, open_storage
from cloudckpt.storage.local import LocalStorage


def _exists(directory: str, name: str) -> bool:
    return open_storage(directory).exists(index_key(name))


def _names(paths: list[str]) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in paths]


class Clock:
    """A patched ``time.time`` (TensorFlow's tests do the same)."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> object:
    fake = Clock()
    with mock.patch("cloudckpt.manager.manager.time.time", fake):
        yield fake


def test_validation(tmp_path: Path) -> None:
    ckpt = Checkpoint()
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(ckpt, tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="step_counter"):
        CheckpointManager(ckpt, tmp_path, max_to_keep=1, checkpoint_interval=5)


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "incremental"])
def test_deletion_keeps_max_to_keep(root: str, clock: Clock, incremental: bool) -> None:
    ckpt = Checkpoint(v=Variable(np.zeros(3)))
    manager = CheckpointManager(ckpt, root, max_to_keep=2, incremental=incremental)
    paths = []
    for _ in range(4):
        clock.now += 1
        paths.append(manager.save())
    assert _names(paths) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert _names(manager.checkpoints) == ["ckpt-3", "ckpt-4"]
    assert [_exists(root, f"ckpt-{i}") for i in range(1, 5)] == [False, False, True, True]
    assert manager.latest_checkpoint == join_url(root, "ckpt-4")
    assert latest_checkpoint(root) == join_url(root, "ckpt-4")
    storage = open_storage(root)
    if not incremental:  # deleted checkpoints leave no data objects behind
        assert [m.key for m in storage.list("ckpt-1")] + [m.key for m in storage.list("ckpt-2")] == []
        return
    # Incremental: the unchanged array still lives in ckpt-1's object, which ckpt-3 and ckpt-4 name;
    # ckpt-2's objects held only a changed save_counter and are gone. Nothing unnamed is left.
    named = {o.name for n in ("ckpt-3", "ckpt-4") for o in load_index(storage, n).objects}
    left = {m.key for m in storage.list("") if ".data-" in m.key}
    assert left == named
    assert [k for k in left if k.startswith("ckpt-1.")] and not [k for k in left if k.startswith("ckpt-2.")]


def test_state_survives_instances_with_preserved_checkpoints(root: str, clock: Clock) -> None:
    ckpt = Checkpoint(v=Variable(1.0))
    first = CheckpointManager(ckpt, root, max_to_keep=2, keep_checkpoint_every_n_hours=1.5)
    clock.now = 10_000.0 + 3600 * 2  # 2 h after the manager's "last preserved"
    first.save()                                   # ckpt-1 @ +2h
    clock.now += 60
    first.save()                                   # ckpt-2
    clock.now += 60
    first.save()                                   # ckpt-3: evicts ckpt-1 -> preserved (>=1.5h after start)
    assert _names(first.checkpoints) == ["ckpt-2", "ckpt-3"]
    assert _names(first.preserved_checkpoints) == ["ckpt-1"]
    assert _exists(root, "ckpt-1")
    clock.now += 60
    first.save()                                   # ckpt-4: evicts ckpt-2, too soon to preserve -> deleted
    assert not _exists(root, "ckpt-2")

    second = CheckpointManager(Checkpoint(v=Variable(0.0)), root, max_to_keep=2,
                               keep_checkpoint_every_n_hours=1.5)
    assert _names(second.checkpoints) == ["ckpt-3", "ckpt-4"]
    assert _names(second.preserved_checkpoints) == ["ckpt-1"]
    state = parse(open_storage(root).get(STATE_KEY).decode(), "x")
    assert state.last_preserved_timestamp == 10_000.0 + 3600 * 2
    assert state.all_model_checkpoint_paths == ["ckpt-3", "ckpt-4"]


def test_keep_all_then_bounded_manager(root: str, clock: Clock) -> None:
    ckpt = Checkpoint()
    keep_all = CheckpointManager(ckpt, root, max_to_keep=None)
    for _ in range(3):
        clock.now += 1
        keep_all.save()
    assert _names(keep_all.checkpoints) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    bounded = CheckpointManager(ckpt, root, max_to_keep=1)
    clock.now += 1
    bounded.save()
    assert _names(bounded.checkpoints) == ["ckpt-4"]
    assert not any(_exists(root, f"ckpt-{i}") for i in (1, 2, 3))


def test_continues_from_unmanaged_checkpoint_save(root: str, clock: Clock) -> None:
    ckpt = Checkpoint(v=Variable(2.0))
    prefix = f"{root}/ckpt"
    ckpt.save(prefix)
    ckpt.save(prefix)
    assert latest_checkpoint(root) == join_url(root, "ckpt-2")
    manager = CheckpointManager(ckpt, root, max_to_keep=1)
    assert manager.checkpoints == []  # no timestamps: never deleted by a manager
    clock.now += 1
    manager.save()
    clock.now += 1
    manager.save()
    assert _exists(root, "ckpt-1") and _exists(root, "ckpt-2")
    assert _names(manager.checkpoints) == ["ckpt-4"]


def test_clock_reset_clamps_with_warning(root: str, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(Checkpoint(), root, max_to_keep=3, keep_checkpoint_every_n_hours=1)
    clock.now += 10
    manager.save()
    clock.now = 100.0  # the clock went backwards
    again = CheckpointManager(Checkpoint(), root, max_to_keep=3, keep_checkpoint_every_n_hours=1)
    assert "clock go backwards" in caplog.text
    assert again.checkpoints == []  # the recovered timestamp is capped at now


def test_custom_numbering_and_name(root: str) -> None:
    ckpt = Checkpoint()
    manager = CheckpointManager(ckpt, root, max_to_keep=2, checkpoint_name="step")
    assert _names([manager.save(checkpoint_number=100)]) == ["step-100"]
    assert int(ckpt.save_counter) == 1
    step = Variable(np.int64(7))
    assert _names([manager.save(checkpoint_number=step)]) == ["step-7"]
    manager.save(checkpoint_number=100)  # re-saving moves it to the newest position
    assert _names(manager.checkpoints) == ["step-7", "step-100"]
    assert int(ckpt.save_counter) == 3


def test_restore_or_initialize(root: str) -> None:
    v = Variable(np.arange(3.0))
    calls = []
    manager = CheckpointManager(Checkpoint(v=v), root, max_to_keep=1, init_fn=lambda: calls.append(1))
    assert manager.restore_or_initialize() is None
    assert calls == [1]
    manager.save()
    w = Variable(np.zeros(3))
    other = CheckpointManager(Checkpoint(v=w), root, max_to_keep=1, init_fn=lambda: calls.append(2))
    assert other.restore_or_initialize() == join_url(root, "ckpt-1")
    np.testing.assert_array_equal(w.numpy(), np.arange(3.0))
    assert calls == [1]


def test_pathlike_directory(tmp_path: Path) -> None:
    manager = CheckpointManager(Checkpoint(), pathlib.PurePosixPath(tmp_path) / "sub", max_to_keep=1)
    assert manager.save() == os.path.join(str(tmp_path), "sub", "ckpt-1")


@pytest.mark.parametrize("restore", [False, True])
def test_checkpoint_interval(root: str, restore: bool) -> None:
    step = Variable(np.int64(0))
    ckpt = Checkpoint(step=step)
    manager = CheckpointManager(ckpt, root, max_to_keep=None, step_counter=step, checkpoint_interval=2)
    if restore:
        manager.save()
        manager = CheckpointManager(ckpt, root, max_to_keep=None, step_counter=step, checkpoint_interval=2)
        manager.restore_or_initialize()
    saved = []
    for i in range(1, 7):
        step.assign(i)
        saved.append(manager.save() is not None)
    assert saved == ([False, True, False, True, False, True] if restore else [True, False, True, False, True, False])
    step.assign(7)
    assert manager.save(check_interval=False) is not None  # interval ignored
    assert manager.save(check_interval=False) is None  # same step as the last save: always skipped


def test_reading_never_writes(root: str) -> None:
    CheckpointManager(Checkpoint(), root, max_to_keep=1)
    latest_checkpoint(root)
    CheckpointManager(Checkpoint(), root, max_to_keep=1).restore_or_initialize()
    assert open_storage(root).list() == []


def test_latest_skips_checkpoints_whose_index_is_gone(root: str, clock: Clock) -> None:
    manager = CheckpointManager(Checkpoint(), root, max_to_keep=3)
    for _ in range(3):
        clock.now += 1
        manager.save()
    open_storage(root).delete("ckpt-3.index")
    assert latest_checkpoint(root) == join_url(root, "ckpt-2")
    assert manager.latest_checkpoint == join_url(root, "ckpt-2")


def test_zombie_writer_is_fenced(root: str, clock: Clock) -> None:
    old = CheckpointManager(Checkpoint(v=Variable(1.0)), root, max_to_keep=3)
    clock.now += 1
    old.save()
    new_ckpt = Checkpoint(v=Variable(2.0))
    new = CheckpointManager(new_ckpt, root, max_to_keep=3)
    new.restore_or_initialize()
    clock.now += 1
    new.save()
    clock.now += 1
    with pytest.raises(ConcurrentWriterError, match="another writer"):
        old.save()
    with pytest.raises(ConcurrentWriterError):
        old.save()
    clock.now += 1
    new.save()
    assert _names(new.checkpoints) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert all(_exists(root, n) for n in ("ckpt-1", "ckpt-2", "ckpt-3"))
    assert latest_checkpoint(root) == join_url(root, "ckpt-3")


def test_fenced_during_upload_rolls_back_only_its_own_write(tmp_path: Path, clock: Clock) -> None:
    old_ckpt = Checkpoint(v=Variable(1.0))
    old = CheckpointManager(old_ckpt, tmp_path, max_to_keep=5)
    clock.now += 1
    old.save()
    new = CheckpointManager(Checkpoint(v=Variable(2.0)), tmp_path, max_to_keep=5)

    real = old_ckpt._write_managed

    def write_then_lose_race(path: str, **kwargs: object) -> str:
        clock.now += 1
        new.save(checkpoint_number=50)  # the new job claims the directory mid-upload
        return real(path, **kwargs)  # type: ignore[arg-type]

    with mock.patch.object(old_ckpt, "_write_managed", write_then_lose_race), \
            pytest.raises(ConcurrentWriterError, match="rolled back"):
        old.save()
    assert not _exists(str(tmp_path), "ckpt-2")
    assert [p.name for p in tmp_path.glob("ckpt-2.*")] == []
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-50")


def test_async_saves_update_state_only_after_commit(tmp_path: Path) -> None:
    ckpt = Checkpoint(v=Variable(np.ones(1000)))
    manager = CheckpointManager(ckpt, tmp_path, max_to_keep=2)
    options = CheckpointOptions(enable_async=True)
    for _ in range(3):
        manager.save(options=options)
    manager.sync()
    assert _names(manager.checkpoints) == ["ckpt-2", "ckpt-3"]
    state = (read_state(open_storage(tmp_path)) or (None,))[0]
    assert state is not None and state.model_checkpoint_path == "ckpt-3"
    manager.close()


@pytest.mark.parametrize("enable_async", [False, True])
def test_evictions_are_deleted_off_the_training_thread_for_async_saves(tmp_path: Path, enable_async: bool) -> None:
    """Async saves delete evicted checkpoints on the background worker, after the state write."""
    import cloudckpt.manager.manager as manager_module

    deleting: list[tuple[str, bool, str | None]] = []
    real_delete = manager_module.delete_checkpoint

    def spy(storage: object, name: str) -> None:
        state = (read_state(open_storage(tmp_path)) or (None,))[0]
        assert state is not None
        deleting.append((name, threading.current_thread() is threading.main_thread(), state.model_checkpoint_path))
        real_delete(storage, name)  # type: ignore[arg-type]

    manager = CheckpointManager(Checkpoint(v=Variable(np.ones(100))), tmp_path, max_to_keep=1)
    with mock.patch.object(manager_module, "delete_checkpoint", spy):
        for _ in range(3):
            manager.save(options=CheckpointOptions(enable_async=enable_async))
        manager.sync()
    # Each eviction happens after the state file already names the newer checkpoint.
    assert deleting == [("ckpt-1", not enable_async, "ckpt-2"), ("ckpt-2", not enable_async, "ckpt-3")]
    assert not _exists(str(tmp_path), "ckpt-1") and not _exists(str(tmp_path), "ckpt-2")


def test_an_eviction_cut_short_is_finished_by_the_next_owner(root: str, clock: Clock) -> None:
    """The state write that evicts ckpt-1 records it as being deleted; a killed (here: failed)
    deletion is finished by the next manager's claim instead of leaving ckpt-1 unlisted forever."""
    import cloudckpt.manager.manager as manager_module

    ckpt = Checkpoint(v=Variable(1.0))
    first = CheckpointManager(ckpt, root, max_to_keep=1)
    clock.now += 1
    first.save()
    with mock.patch.object(manager_module, "delete_checkpoint", side_effect=OSError("killed")):
        clock.now += 1
        assert _names([first.save()]) == ["ckpt-2"]  # the commit stands; the deletion is retried later
    state = parse(open_storage(root).get(STATE_KEY).decode(), "state")
    assert state.all_model_checkpoint_paths == ["ckpt-2"] and state.deleting == ["ckpt-1"]
    assert _exists(root, "ckpt-1")

    second = CheckpointManager(ckpt, root, max_to_keep=1)  # a new process, resumed (save_counter 2)
    clock.now += 1
    second.save()
    assert not _exists(root, "ckpt-1") and not _exists(root, "ckpt-2") and _exists(root, "ckpt-3")
    # ckpt-1 is done; ckpt-2, evicted by this save, stays recorded until the next state write.
    assert parse(open_storage(root).get(STATE_KEY).decode(), "state").deleting == ["ckpt-2"]


def test_keep_best_and_metadata(tmp_path: Path, clock: Clock) -> None:
    from cloudckpt.restoring.checkpoint_reader import load_checkpoint

    manager = CheckpointManager(Checkpoint(), tmp_path, max_to_keep=1, keep_best=BestN("loss", 1))
    for loss in (0.5, 0.1, 0.9, 0.7):
        clock.now += 1
        manager.save(metadata={"loss": loss})
    assert _names(manager.checkpoints) == ["ckpt-2", "ckpt-4"]
    assert load_checkpoint(str(tmp_path / "ckpt-2")).metadata["loss"] == 0.1


@pytest.mark.parametrize("content", [b"", b"garbage line", b"\xff\xfe", b'model_checkpoint_path: "ckpt-1'])
def test_broken_state_file_warns_and_recovers(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_KEY).write_bytes(content)
    ckpt = Checkpoint(v=Variable(1.0))
    with pytest.warns(RuntimeWarning) if content not in (b"",) else _no_warning():
        manager = CheckpointManager(ckpt, tmp_path, max_to_keep=1)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert manager.save() == str(tmp_path / "ckpt-1")
    assert [str(w.message) for w in later] == []  # warned once, at construction, not again at the claim
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class RecordingStorage(LocalStorage):
    """Local disk that records every key it writes and reads (to see which storage a save used)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.written: list[str] = []
        self.read: list[str] = []

    def put(self, key: str, data: Any, **kwargs: Any) -> ObjectMeta:
        self.written.append(key)
        return super().put(key, data, **kwargs)

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        self.read.append(key)
        return super().get(key, byte_range)

    def read_into(self, requests: Sequence[ReadRequest]) -> None:
        self.read.extend(r.key for r in requests)
        super().read_into(requests)


@pytest.mark.parametrize("as_directory", [False, True], ids=["storage=", "directory"])
def test_the_storage_given_carries_every_object(tmp_path: Path, as_directory: bool) -> None:
    """Index, data and state file all go through the Storage the manager was given - and restores too."""
    storage = RecordingStorage(tmp_path)
    step = Variable(0)

    def manager() -> CheckpointManager:
        ckpt = Checkpoint(step=step, w=np.arange(5.0))
        if as_directory:
            return CheckpointManager(ckpt, storage, max_to_keep=1)
        return CheckpointManager(ckpt, str(tmp_path), max_to_keep=1, storage=storage)

    first = manager()
    for n in (1, 2):
        step.assign(n)
        first.save()
    assert {"checkpoint", "ckpt-1.index", "ckpt-2.index"} <= set(storage.written)
    assert any(k.startswith("ckpt-2.data-") for k in storage.written)
    storage.read.clear()
    step.assign(0)
    assert manager().restore_or_initialize() == join_url(first.directory, "ckpt-2")
    assert int(step) == 2
    assert "ckpt-2.index" in storage.read and any(k.startswith("ckpt-2.data-") for k in storage.read)


def test_a_location_carries_its_storage(tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path)
    path = Checkpoint(w=np.ones(3)).write(Location(storage, "custom"))
    assert path == storage.url_for("custom")
    assert "custom.index" in storage.written
    target = np.zeros(3)
    Checkpoint(w=target).read(Location(storage, "custom")).assert_consumed()
    assert target.tolist() == [1.0, 1.0, 1.0] and "custom.index" in storage.read


def _damage(storage: Any, name: str) -> None:
    """Flip one byte of a data object of ``name`` (a bit rot the CRC32C catches)."""
    obj = load_index(storage, name).objects[0].name
    raw = bytearray(storage.get(obj))
    raw[len(raw) // 2] ^= 0x40
    storage.put(obj, bytes(raw))


def test_resume_skips_a_damaged_latest_checkpoint_for_the_newest_intact_one(root: str) -> None:
    from cloudckpt.errors import NoIntactCheckpointError

    w = np.zeros(1000)
    manager = CheckpointManager(Checkpoint(w=w), root, max_to_keep=2, incremental=False)
    for n in (1, 2, 3):
        w[:] = n
        manager.save()
    storage = open_storage(root)
    _damage(storage, "ckpt-3")
    w[:] = -1
    resumed = CheckpointManager(Checkpoint(w=w), root, max_to_keep=2, incremental=False)
    with pytest.warns(RuntimeWarning, match=r"ckpt-3 is damaged or incomplete \(ChecksumError"):
        assert resumed.restore_or_initialize() == join_url(root, "ckpt-2")
    assert (w == 2).all()  # fully restored from ckpt-2, not a mix
    w[:] = 7
    assert resumed.save() == join_url(root, "ckpt-3")  # the numbering continues from ckpt-2
    assert _exists(root, "ckpt-2"), "the checkpoint the job resumed from was evicted by the next save"
    _damage(storage, "ckpt-2")
    _damage(storage, "ckpt-3")
    with pytest.warns(RuntimeWarning), pytest.raises(NoIntactCheckpointError, match=r"ckpt-3.*ckpt-2"):
        CheckpointManager(Checkpoint(w=w), root, max_to_keep=2).restore_or_initialize()


def test_resume_does_not_hide_a_mismatch_behind_older_checkpoints(tmp_path: Path) -> None:
    from cloudckpt.errors import CheckpointMismatchError

    manager = CheckpointManager(Checkpoint(w=np.zeros(4)), tmp_path, max_to_keep=3)
    manager.save()
    manager.save()
    with pytest.raises(CheckpointMismatchError):
        CheckpointManager(Checkpoint(w=np.zeros(5)), tmp_path, max_to_keep=3).restore_or_initialize()


def test_a_manager_on_a_store_without_conditional_writes_says_it_cannot_fence() -> None:
    directory = f"memory://fencing-{uuid.uuid4().hex[:8]}/run"
    manager = CheckpointManager(Checkpoint(w=np.zeros(3)), directory, max_to_keep=2)
    with pytest.warns(RuntimeWarning, match="cannot fence writers here"):
        manager.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per directory, not at every save
        manager.save()
