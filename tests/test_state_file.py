"""The TensorFlow-compatible state file: parse, format, compare-and-swap, recovery."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cloudckpt.errors import CheckpointFormatError, PreconditionError
from cloudckpt.format.state_file import (
    STATE_KEY,
    CheckpointState,
    CheckpointStateError,
    format_state,
    parse,
    read_state,
    record_checkpoint,
    write_state,
)
from cloudckpt.storage.local import LocalStorage

TF_WRITTEN = '''model_checkpoint_path: "ckpt-7"
all_model_checkpoint_paths: "ckpt-6"
all_model_checkpoint_paths: "ckpt-7"
all_model_checkpoint_timestamps: 1700000000.25
all_model_checkpoint_timestamps: 1700000100.5
last_preserved_timestamp: 1699999999.0
'''


def test_parses_what_tensorflow_writes() -> None:
    state = parse(TF_WRITTEN, "dir/checkpoint")
    assert state.model_checkpoint_path == "ckpt-7"
    assert state.all_model_checkpoint_paths == ["ckpt-6", "ckpt-7"]
    assert state.all_model_checkpoint_timestamps == [1700000000.25, 1700000100.5]
    assert state.last_preserved_timestamp == 1699999999.0
    assert state.writer is None


def test_format_round_trips_and_hides_extras_in_comments() -> None:
    state = CheckpointState("ckpt-2", ["ckpt-1", "ckpt-2"], [1.5, 2.25], 0.5, writer="tok-1",
                            preserved={"ckpt-0": 0.5}, metrics={"ckpt-2": -1.25})
    text = format_state(state)
    assert all(line.startswith(("#", "model_", "all_", "last_")) for line in text.splitlines())
    assert parse(text, "x") == state


def test_escaped_paths_round_trip() -> None:
    state = CheckpointState('we"ird\tname', ['we"ird\tname'], preserved={'"q"': 1.0})
    assert parse(format_state(state), "x") == state


def test_empty_file_is_an_empty_state() -> None:
    assert parse("", "x") == CheckpointState()


@pytest.mark.parametrize("text, message", [
    ("model_checkpoint_path: ckpt-7", "quoted string"),
    ('model_checkpoint_path: "ckpt-7', "quoted string"),
    ("garbage", "expected 'field: value'"),
    ('unknown_field: "x"', "unknown field"),
    ("all_model_checkpoint_timestamps: soon", "expected a number"),
    ("last_preserved_timestamp: nan", "finite"),
    ('all_model_checkpoint_paths: "a"\nall_model_checkpoint_timestamps: 1\nall_model_checkpoint_timestamps: 2',
     "1 paths but 2 timestamps"),
    ('# cloudckpt-preserved: nope', "bad cloudckpt-preserved"),
])
def test_nonsense_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(CheckpointStateError, match=message) as info:
        parse(text, "gs://b/run/checkpoint")
    assert "gs://b/run/checkpoint" in str(info.value)
    assert isinstance(info.value, CheckpointFormatError)


def test_compare_and_swap(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    assert read_state(store) is None
    first = write_state(store, CheckpointState("ckpt-1", ["ckpt-1"]), None)
    with pytest.raises(PreconditionError):
        write_state(store, CheckpointState("ckpt-x", ["ckpt-x"]), None)
    state, meta = read_state(store) or (None, None)
    assert state is not None and meta is not None and meta.version == first.version
    write_state(store, CheckpointState("ckpt-2", ["ckpt-2"]), meta)
    with pytest.raises(PreconditionError):
        write_state(store, CheckpointState("ckpt-3", ["ckpt-3"]), meta)
    assert (read_state(store) or (None,))[0] == CheckpointState("ckpt-2", ["ckpt-2"])


def test_record_checkpoint_replaces_garbage_and_races_safely(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put(STATE_KEY, b"\xff\xfe not text")
    record_checkpoint(store, "ckpt-1")
    threads = [threading.Thread(target=record_checkpoint, args=(store, f"ckpt-{i}")) for i in range(2, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    state = (read_state(store) or (None,))[0]
    assert state is not None
    assert state.all_model_checkpoint_paths == [state.model_checkpoint_path]
    assert state.model_checkpoint_path in {f"ckpt-{i}" for i in range(2, 8)}
    assert state.all_model_checkpoint_timestamps == []


# ---------------------------------------------------------------------- hostile state files
BIG = 4 * 1024 * 1024  # characters: under the 16 MiB cap; quadratic parsing would take hours


@pytest.mark.parametrize("text, message", [
    pytest.param("all_model_checkpoint_timestamps: 1" + " " * BIG + "2", "expected a number", id="spaces in number"),
    pytest.param('# cloudckpt-preserved: "a"' + " " * BIG + "x", "expected a number", id="spaces in comment"),
    pytest.param('model_checkpoint_path: "' + "\\n" * BIG, "quoted string", id="escapes, no closing quote"),
    pytest.param('model_checkpoint_path: "' + "\\" + '"' * BIG, "quoted string", id="escaped quotes"),
    pytest.param("model_checkpoint_path" + " " * BIG + "x", "expected 'field: value'", id="no colon"),
    pytest.param("last_preserved_timestamp: " + "1" * BIG, "expected a number", id="a megabyte of digits"),
])
def test_hostile_lines_are_refused_in_linear_time(text: str, message: str) -> None:
    with pytest.raises(CheckpointStateError, match=message) as info:
        parse(text, "s3://b/run/checkpoint")
    assert len(str(info.value)) < 300  # the message quotes a bounded excerpt, not megabytes


def test_long_runs_of_spaces_still_parse(tmp_path: Path) -> None:
    name = "ckpt" + " " * BIG + "7"
    store = LocalStorage(tmp_path)
    store.put(STATE_KEY, f'model_checkpoint_path:{" " * BIG}"{name}"{" " * BIG}\n'.encode())
    found = read_state(store)
    assert found is not None and found[0].model_checkpoint_path == name


@pytest.mark.parametrize("bad", ["../other-run/ckpt-3", "ckpt/../../x", "./ckpt-1", "/abs/../ckpt-1", "a\\\\b",
                                 "bad\x00name", ""])
@pytest.mark.parametrize("field", ["model_checkpoint_path: {}", "all_model_checkpoint_paths: {}",
                                   "# cloudckpt-deleting: {}", "# cloudckpt-preserved: {} 1.5",
                                   "# cloudckpt-metric: {} 0.25"])
def test_paths_that_would_leave_the_directory_make_the_file_garbled(field: str, bad: str) -> None:
    with pytest.raises(CheckpointStateError, match="path"):
        parse(field.format(f'"{bad}"'), "x")


def test_absolute_paths_are_left_to_the_caller() -> None:
    """TensorFlow writes absolute paths; the manager makes those under its directory relative."""
    state = parse('model_checkpoint_path: "/data/run/ckpt-2"\nall_model_checkpoint_paths: "s3://b/run/ckpt-2"',
                  "x")
    assert state.model_checkpoint_path == "/data/run/ckpt-2"
    assert state.all_model_checkpoint_paths == ["s3://b/run/ckpt-2"]


def test_an_escaping_state_file_is_garbled_so_resume_lists_the_directory(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before, ``../elsewhere-9`` reached the store and failed with a fatal ``InvalidKeyError``."""
    from cloudckpt import Checkpoint, CheckpointManager, Variable, latest_checkpoint

    run = tmp_path / "run"
    Checkpoint(v=Variable(4.0)).write(str(run / "ckpt-4"))
    (run / STATE_KEY).write_text('model_checkpoint_path: "../elsewhere-9"\n'
                                 'all_model_checkpoint_paths: "../elsewhere-9"\n')
    with caplog.at_level("WARNING", logger="cloudckpt"):
        assert latest_checkpoint(run) == str(run / "ckpt-4")
    assert "'.' or '..' segment" in caplog.text and "listing" in caplog.text
    v = Variable(0.0)
    with pytest.warns(RuntimeWarning, match=r"'\.' or '\.\.' segment"):
        manager = CheckpointManager(Checkpoint(v=v), run, max_to_keep=2)
        assert manager.restore_or_initialize() == str(run / "ckpt-4")
    assert float(v) == 4.0


# ---------------------------------------------------------------------- Checkpoint.save into a manager's directory
def test_checkpoint_save_refuses_a_directory_a_manager_owns(tmp_path: Path) -> None:
    """TensorFlow rewrites the state file to list only its own checkpoint, orphaning the manager's."""
    from cloudckpt import Checkpoint, CheckpointManager, ConcurrentWriterError, Variable

    manager = CheckpointManager(Checkpoint(v=Variable(1.0)), tmp_path, max_to_keep=3)
    manager.save()
    manager.save()
    before = (tmp_path / STATE_KEY).read_bytes()
    with pytest.raises(ConcurrentWriterError, match=r"managed by a CheckpointManager.*manager\.save\(\)") as info:
        Checkpoint(v=Variable(2.0)).save(str(tmp_path / "mine"))
    assert "nothing was written" in str(info.value) and not list(tmp_path.glob("mine*"))
    assert (tmp_path / STATE_KEY).read_bytes() == before
    assert manager.checkpoints == [str(tmp_path / "ckpt-1"), str(tmp_path / "ckpt-2")]
    manager.save()  # the manager is not fenced off: its state file was never touched
    assert manager.latest_checkpoint == str(tmp_path / "ckpt-3")


def test_check_unmanaged_refuses_before_writing(tmp_path: Path) -> None:
    from cloudckpt import ConcurrentWriterError
    from cloudckpt.format.state_file import check_unmanaged

    store = LocalStorage(tmp_path)
    check_unmanaged(store, "ckpt-1")  # no state file
    write_state(store, CheckpointState("c-1", ["c-1"]), None)
    check_unmanaged(store, "ckpt-1")  # a plain Checkpoint.save's state file
    record_checkpoint(store, "c-2")
    state, meta = read_state(store) or (None, None)
    assert state is not None and meta is not None and state.model_checkpoint_path == "c-2"
    write_state(store, CheckpointState("c-1", ["c-1"], writer="tok-9"), meta)
    with pytest.raises(ConcurrentWriterError, match="nothing was written for"):
        check_unmanaged(store, "ckpt-1")
