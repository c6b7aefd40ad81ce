"""Async saves: snapshot isolation, ordering, failure surfacing, budget, stats, shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import FaultyStorage, install, uninstall

from cloudckpt import Checkpoint, CheckpointOptions, SaveError, Variable

ASYNC = CheckpointOptions(enable_async=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FaultyStorage]:
    storage = FaultyStorage(tmp_path)
    install(storage)
    yield storage
    if storage.gate is not None:
        storage.gate.set()
    uninstall(storage)


def restored_value(path: str, shape: tuple[int, ...] = (4,)) -> np.ndarray:
    target = np.zeros(shape)
    Checkpoint(a=target).read(path).expect_partial()
    return target


def test_async_save_returns_before_upload_and_snapshot_is_isolated(store: FaultyStorage, tmp_path: Path) -> None:
    live = np.ones(4)
    ckpt = Checkpoint(a=live)
    store.gate = threading.Event()
    path = ckpt.save(tmp_path / "c", options=ASYNC)
    assert store.gate_reached.wait(30)
    assert not (tmp_path / "c-1.index").exists()
    assert not (tmp_path / "checkpoint").exists()  # the state file changes only after the commit
    live[:] = 99  # training continues; must not leak into the in-flight checkpoint
    store.gate.set()
    ckpt.sync(timeout=60)
    np.testing.assert_array_equal(restored_value(path), np.ones(4))
    assert "c-1" in (tmp_path / "checkpoint").read_text()


def test_second_save_waits_for_first(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(a=np.ones(4))
    store.gate = threading.Event()
    ckpt.save(tmp_path / "c", options=ASYNC)
    assert store.gate_reached.wait(30)
    second_done = threading.Event()

    def second() -> None:
        ckpt.save(tmp_path / "c", options=ASYNC)
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not second_done.wait(0.5)  # blocked behind the first save
    store.gate.set()
    thread.join(60)
    assert second_done.is_set()
    ckpt.sync(timeout=60)
    assert (tmp_path / "c-1.index").exists() and (tmp_path / "c-2.index").exists()


def test_true_save_counter_is_stored(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(a=np.ones(4))
    for _ in range(3):
        path = ckpt.save(tmp_path / "c", options=ASYNC)
    ckpt.sync(timeout=60)
    fresh = Checkpoint(a=np.zeros(4))
    fresh.restore(path).assert_consumed()
    assert int(fresh.save_counter) == 3
    assert fresh.save(tmp_path / "c").endswith("c-4")  # a resumed job does not overwrite ckpt-1


def test_background_failure_is_reraised_by_sync_once(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(a=np.ones(4))
    store.fail_put = lambda key: ".data-" in key
    ckpt.save(tmp_path / "c", options=ASYNC)
    with pytest.raises(SaveError, match="injected failure") as info:
        ckpt.sync(timeout=60)
    assert info.value.__cause__ is not None
    assert not (tmp_path / "c-1.index").exists()
    assert not list(tmp_path.glob("c-1.data-*"))  # a failed save leaves nothing visible or orphaned
    ckpt.sync(timeout=60)  # reported once
    store.fail_put = lambda key: False
    path = ckpt.save(tmp_path / "c", options=ASYNC)
    ckpt.sync(timeout=60)
    assert path.endswith("c-2") and (tmp_path / "c-2.index").exists()


def test_next_save_reraises_previous_failure(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(a=np.ones(4))
    store.fail_put = lambda key: key.endswith(".index")
    ckpt.save(tmp_path / "c", options=ASYNC)
    with pytest.raises(SaveError, match="c-1"):
        ckpt.save(tmp_path / "c")
    assert int(ckpt.save_counter) == 1  # the call that reported the failure did not count
    assert not (tmp_path / "c-1.index").exists() and not list(tmp_path.glob("c-1.data-*"))
    store.fail_put = lambda key: False
    assert ckpt.save(tmp_path / "c").endswith("c-2")


def test_async_callbacks_after_commit_and_their_errors(store: FaultyStorage, tmp_path: Path) -> None:
    seen: list[bool] = []

    def check(path: str) -> None:
        seen.append(Path(path + ".index").exists())

    def boom() -> None:
        raise RuntimeError("late callback")

    ckpt = Checkpoint(a=np.ones(4))
    ckpt.save(tmp_path / "c", options=CheckpointOptions(enable_async=True, experimental_write_callbacks=[check]))
    ckpt.sync(timeout=60)
    assert seen == [True]
    ckpt.save(tmp_path / "c", options=CheckpointOptions(enable_async=True, experimental_write_callbacks=[boom]))
    with pytest.raises(SaveError, match="late callback"):
        ckpt.sync(timeout=60)
    assert (tmp_path / "c-2.index").exists()


def test_budget_overflow_uploads_before_returning(store: FaultyStorage, tmp_path: Path) -> None:
    state = {"small": np.ones(8), "big": np.arange(10_000.0)}
    ckpt = Checkpoint(s=state)
    options = CheckpointOptions(enable_async=True, async_staging_budget=1024)
    path = ckpt.save(tmp_path / "c", options=options)
    big_objects = [k for k in store.puts if ".data-" in k]
    assert big_objects  # the overflow object was written while the caller waited
    state["big"][:] = -1
    state["small"][:] = -1
    ckpt.sync(timeout=60)
    stats = ckpt.last_save_stats
    assert stats is not None and stats.asynchronous
    assert stats.overflow_bytes >= 80_000 and 0 < stats.staged_bytes < 1024
    target = {"small": np.zeros(8), "big": np.zeros(10_000)}
    Checkpoint(s=target).restore(path).assert_consumed()
    np.testing.assert_array_equal(target["small"], np.ones(8))
    np.testing.assert_array_equal(target["big"], np.arange(10_000.0))


def test_staging_buffer_is_reused(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(a=np.ones(1000))
    ckpt.save(tmp_path / "c", options=ASYNC)
    ckpt.sync(timeout=60)
    saver = ckpt._saver
    assert saver is not None
    buffer = saver.staging._buffer
    ckpt.save(tmp_path / "c", options=ASYNC)
    ckpt.sync(timeout=60)
    assert saver.staging._buffer is buffer


def test_stats_and_log_line(store: FaultyStorage, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = Checkpoint(a=np.ones(1000), b=np.ones(10))
    with caplog.at_level(logging.INFO, logger="cloudckpt.checkpoint"):
        path = ckpt.save(tmp_path / "c")
    stats = ckpt.last_save_stats
    assert stats is not None and stats.path == path and not stats.asynchronous
    assert stats.bytes > 8080 and stats.objects == 2 and stats.seconds >= stats.blocked_seconds >= 0
    assert any("saved" in r.message and path in r.message for r in caplog.records)
    with caplog.at_level(logging.INFO, logger="cloudckpt.checkpoint"):
        ckpt.save(tmp_path / "c", options=ASYNC)
        ckpt.sync(timeout=60)
    assert ckpt.last_save_stats is not None and ckpt.last_save_stats.asynchronous


def test_sync_timeout_is_bounded(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(a=np.ones(4))
    store.gate = threading.Event()
    ckpt.save(tmp_path / "c", options=ASYNC)
    with pytest.raises(TimeoutError):
        ckpt.sync(timeout=0.2)
    store.gate.set()
    ckpt.sync(timeout=60)


def test_close_and_context_manager_finish_in_flight(store: FaultyStorage, tmp_path: Path) -> None:
    with Checkpoint(a=np.ones(4)) as ckpt:
        path = ckpt.save(tmp_path / "c", options=ASYNC)
    assert Path(path + ".index").exists()
    ckpt2 = Checkpoint(v=Variable(2.0))
    path2 = ckpt2.save(tmp_path / "d", options=ASYNC)
    ckpt2.close()
    assert Path(path2 + ".index").exists()


def test_restore_waits_for_in_flight_save(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(a=np.full(4, 3.0))
    path = ckpt.save(tmp_path / "c", options=ASYNC)
    ckpt.restore(path).assert_consumed()
    np.testing.assert_array_equal(restored_value(path), np.full(4, 3.0))


def test_concurrent_writer_error_is_not_wrapped(store: FaultyStorage, tmp_path: Path) -> None:
    from cloudckpt.errors import ConcurrentWriterError

    def fence(_: object) -> None:
        raise ConcurrentWriterError("fenced")

    ckpt = Checkpoint(a=np.ones(4))
    ckpt._write_managed(tmp_path / "c", ASYNC, after_commit=fence)
    with pytest.raises(ConcurrentWriterError, match="fenced"):
        ckpt.sync(timeout=60)


def test_overflow_upload_failure_raises_from_save(store: FaultyStorage, tmp_path: Path) -> None:
    ckpt = Checkpoint(s={"big": np.ones(10_000)})
    store.fail_put = lambda key: ".data-" in key
    with pytest.raises(Exception, match="injected failure"):
        ckpt.save(tmp_path / "c", options=CheckpointOptions(enable_async=True, async_staging_budget=0))
    ckpt.sync(timeout=60)  # nothing was left running
    assert not list(tmp_path.glob("c-1*"))


def test_interpreter_exit_finishes_in_flight_save(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import numpy as np, cloudckpt\n"
        "ckpt = cloudckpt.Checkpoint(a=np.arange(200_000.0))\n"
        f"print(ckpt.save({str(tmp_path / 'c')!r}, options=cloudckpt.CheckpointOptions(enable_async=True)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    path = out.stdout.strip()
    target = np.zeros(200_000)
    Checkpoint(a=target).restore(path).assert_consumed()
    np.testing.assert_array_equal(target, np.arange(200_000.0))
