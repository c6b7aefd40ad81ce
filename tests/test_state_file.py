"""The TensorFlow-compatible state file: parse, format, compare-and-swap, recovery."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cloudckpt.errors import CheckpointFormatError, PreconditionError
from cloudckpt.state_file import (
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
    state = CheckpointState('we"ird\\name', ['we"ird\\name'])
    assert parse(format_state(state), "x").model_checkpoint_path == 'we"ird\\name'


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
