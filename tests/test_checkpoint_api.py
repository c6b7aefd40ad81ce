"""TensorFlow's Checkpoint behaviour, on local disk: construction, numbering, restore, status."""

from __future__ import annotations

import gc
import math
import os
import warnings
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckpt_helpers import Dense, FaultyStorage, Model, install, uninstall

import cloudckpt
from cloudckpt import Checkpoint, CheckpointOptions, Trackable, Variable
from cloudckpt.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConcurrentWriterError,
    NotFoundError,
)
from cloudckpt.format.state_file import parse


def data_objects(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f"{name}.data-"))


# ---------------------------------------------------------------------- construction
def test_kwargs_must_be_trackable() -> None:
    with pytest.raises(ValueError, match="expecting x to be a trackable"):
        Checkpoint(x=3)
    with pytest.raises(ValueError, match="expecting f to be a trackable"):
        Checkpoint(f=lambda: None)
    Checkpoint(v=Variable(1.0), a=np.zeros(2), d={"x": 1}, lst=[np.ones(1)], m=Model())


def test_root_must_be_trackable() -> None:
    with pytest.raises(ValueError, match="root to be a trackable"):
        Checkpoint(np.zeros(3))  # type: ignore[arg-type]


def test_save_counter_kwarg_is_refused() -> None:
    with pytest.raises(ValueError, match="save_counter"):
        Checkpoint(save_counter=Variable(0))
    with pytest.raises(ValueError, match="reserved"):
        Checkpoint(restore=Variable(0))


def test_kwarg_clashing_with_root_attribute() -> None:
    root = Model()
    with pytest.raises(ValueError, match=r"root\.layers already exists"):
        Checkpoint(root, layers=[Dense(1, 1)])
    Checkpoint(root, layers=root.layers)  # the same object is fine
    Checkpoint(root, extra=Variable(2))


def test_save_counter_starts_at_zero_and_counts(tmp_path: Path) -> None:
    ckpt = Checkpoint(v=Variable(1.0))
    assert int(ckpt.save_counter) == 0
    assert ckpt.save(tmp_path / "ckpt") == str(tmp_path / "ckpt-1")
    assert ckpt.save(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt-2")
    assert int(ckpt.save_counter) == 2
    assert (tmp_path / "ckpt-2.index").exists()


def test_write_does_not_number_nor_count(tmp_path: Path) -> None:
    ckpt = Checkpoint(v=Variable(1.0))
    assert ckpt.write(tmp_path / "exact") == str(tmp_path / "exact")
    assert int(ckpt.save_counter) == 0
    assert (tmp_path / "exact.index").exists()
    assert not (tmp_path / "checkpoint").exists()


def test_save_records_state_file_like_tensorflow(tmp_path: Path) -> None:
    ckpt = Checkpoint(v=Variable(1.0))
    ckpt.save(tmp_path / "ckpt")
    ckpt.save(tmp_path / "ckpt")
    state = parse((tmp_path / "checkpoint").read_text(), "checkpoint")
    assert state.model_checkpoint_path == "ckpt-2"
    assert state.all_model_checkpoint_paths == ["ckpt-2"]
    assert state.all_model_checkpoint_timestamps == []


# ---------------------------------------------------------------------- round trips
def test_restore_round_trip_in_place(tmp_path: Path) -> None:
    model = Model(seed=1)
    ckpt = Checkpoint(model=model, step=Variable(7, dtype=np.int64))
    path = ckpt.save(tmp_path / "ckpt")

    fresh = Model(seed=2)
    kernel_ref = fresh.layers[0].kernel._buffer()
    bias_ref = fresh.layers[1].bias
    step = Variable(0, dtype=np.int64)
    new = Checkpoint(model=fresh, step=step)
    new.restore(path).assert_consumed()
    np.testing.assert_array_equal(kernel_ref, model.layers[0].kernel.numpy())
    assert bias_ref is fresh.layers[1].bias  # restored in place: outside references see it
    assert int(step) == 7 and int(new.save_counter) == 1
    assert fresh.config == {"lr": 0.1, "name": "model", 0: "int-keyed"}


def test_values_keys_and_containers_round_trip(tmp_path: Path) -> None:
    Point = namedtuple("Point", "x y")
    state = {
        "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "none": None, "flag": True, "big": 2**100,
        "text": "héllo/wörld", 0: "int", 1.5: "float", None: "none-key", True: "bool-key", "": "empty",
        "a/b": 1, "~x": 2, "#tag": 3, "nested": [1, (2, [3.5, {"k": np.arange(3)}])], "pt": Point(1, 2.0),
        "np_scalar": np.float32(2.5),
    }
    ckpt = Checkpoint(state=state)
    path = ckpt.write(tmp_path / "c")
    target = {
        "nan": 0.0, "inf": 0.0, "ninf": 0.0, "none": 1, "flag": False, "big": 0, "text": "", 0: "", 1.5: "",
        None: "", True: "", "": "", "a/b": 0, "~x": 0, "#tag": 0, "nested": [0, (0, [0.0, {"k": np.zeros(3, int)}])],
        "pt": Point(0, 0.0), "np_scalar": np.float32(0),
    }
    Checkpoint(state=target).read(path).assert_consumed()
    assert math.isnan(target["nan"]) and target["inf"] == math.inf and target["ninf"] == -math.inf
    assert target["none"] is None and target["flag"] is True and target["big"] == 2**100
    assert target["text"] == "héllo/wörld" and target[0] == "int" and target[1.5] == "float"
    assert target[None] == "none-key" and target[True] == "bool-key" and target[""] == "empty"
    assert (target["a/b"], target["~x"], target["#tag"]) == (1, 2, 3)
    assert target["nested"][0] == 1 and target["nested"][1][0] == 2 and target["nested"][1][1][0] == 3.5
    np.testing.assert_array_equal(target["nested"][1][1][1]["k"], np.arange(3))
    assert target["pt"] == Point(1, 2.0) and type(target["pt"]) is Point
    assert target["np_scalar"] == np.float32(2.5) and isinstance(target["np_scalar"], np.float32)
    keys = [k for k, _ in cloudckpt.list_variables(path)]
    assert "state/#0" in keys and "state/a~1b" in keys and "state/~0x" in keys and "state/~2tag" in keys


def test_int_keys_stay_int_for_optimizer_like_state(tmp_path: Path) -> None:
    opt_state = {"state": {0: {"m": np.ones(2)}, 1: {"m": np.ones(3)}}}
    path = Checkpoint(opt=opt_state).write(tmp_path / "c")
    loaded = cloudckpt.load_variable(path, "opt")
    assert set(loaded["state"]) == {0, 1}


def test_scalar_attributes_of_trackables_are_restored(tmp_path: Path) -> None:
    class Counter(Trackable):
        def __init__(self) -> None:
            self.count = 0
            self.label = "a"

    counter = Counter()
    counter.count, counter.label = 5, "b"
    path = Checkpoint(c=counter).write(tmp_path / "c")
    fresh = Counter()
    Checkpoint(c=fresh).read(path).assert_consumed()
    assert (fresh.count, fresh.label) == (5, "b")


def test_rooted_checkpoint_saves_root_dependencies(tmp_path: Path) -> None:
    model = Model(seed=3)
    path = Checkpoint(model, extra=Variable(2.0)).write(tmp_path / "c")
    keys = [k for k, _ in cloudckpt.list_variables(path)]
    assert "layers/0/kernel" in keys and "extra" in keys
    fresh = Model(seed=4)
    Checkpoint(fresh, extra=Variable(0.0)).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh.layers[0].kernel.numpy(), model.layers[0].kernel.numpy())


# ---------------------------------------------------------------------- refusals
def test_unsupported_values_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'m/config/fn'.*function"):
        Checkpoint(m={"config": {"fn": lambda: 1}}).write(tmp_path / "c")
    with pytest.raises(ValueError, match="object arrays are refused"):
        Checkpoint(a=np.array([object()], dtype=object)).write(tmp_path / "c")
    with pytest.raises(ValueError, match="tuple key"):
        Checkpoint(d={(1, 2): 3}).write(tmp_path / "c")
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="cycle"):
        Checkpoint(loop=loop).write(tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_private_helpers_are_not_dependencies(tmp_path: Path) -> None:
    class WithHelpers(Trackable):
        def __init__(self) -> None:
            self._log = print
            self._w = Variable(1.0)

    path = Checkpoint(x=WithHelpers()).write(tmp_path / "c")
    assert [k for k, _ in cloudckpt.list_variables(path)] == ["save_counter", "x/_w"]


# ---------------------------------------------------------------------- errors on restore
def test_restore_missing_path_hints_at_suffix(tmp_path: Path) -> None:
    ckpt = Checkpoint(v=Variable(1.0))
    ckpt.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointNotFoundError, match=r"ckpt-1") as info:
        ckpt.restore(tmp_path / "ckpt")
    assert isinstance(info.value, NotFoundError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError, match="writes '<prefix>-N'"):
        ckpt.restore(tmp_path / "other")


def test_restore_none_is_initialization_only() -> None:
    status = Checkpoint(v=Variable(1.0)).restore(None)
    for check in (status.assert_consumed, status.assert_existing_objects_matched, status.assert_nontrivial_match):
        with pytest.raises(AssertionError, match="No checkpoint specified"):
            check()
    assert status.expect_partial() is status
    status.run_restore_ops()
    status.initialize_or_restore()


def test_shape_mismatch_leaves_everything_untouched(tmp_path: Path) -> None:
    path = Checkpoint(a=Variable(np.ones(3)), b=np.full((2, 2), 5.0), c={"s": 9}).write(tmp_path / "c")
    a = Variable(np.zeros(3))
    b = np.zeros((3, 2))
    c = {"s": 0}
    with pytest.raises(CheckpointMismatchError, match=r"'b'.*\(2, 2\).*\(3, 2\)"):
        Checkpoint(a=a, b=b, c=c).read(path)
    assert not a.numpy().any() and not b.any() and c == {"s": 0}


def test_dtype_mismatch_names_both_dtypes(tmp_path: Path) -> None:
    path = Checkpoint(a=np.ones(3, np.float32)).write(tmp_path / "c")
    with pytest.raises(CheckpointMismatchError, match=r"float32.*float64"):
        Checkpoint(a=np.zeros(3, np.float64)).read(path)


def test_type_mismatch(tmp_path: Path) -> None:
    path = Checkpoint(a={"x": np.ones(1)}).write(tmp_path / "c")
    with pytest.raises(CheckpointMismatchError, match="dict"):
        Checkpoint(a=[np.ones(1)]).read(path)


# ---------------------------------------------------------------------- load status
def test_assert_consumed_names_unmatched(tmp_path: Path) -> None:
    path = Checkpoint(a=Variable(1.0), b=Variable(2.0)).write(tmp_path / "c")
    status = Checkpoint(a=Variable(0.0), z=Variable(0.0)).read(path)
    with pytest.raises(AssertionError, match="'b'"):
        status.assert_consumed()
    with pytest.raises(AssertionError, match="'z'"):
        status.assert_existing_objects_matched()
    status.assert_nontrivial_match()
    status.expect_partial()


def test_existing_objects_matched_allows_unused_checkpoint_values(tmp_path: Path) -> None:
    path = Checkpoint(a=Variable(1.0), b=Variable(2.0)).write(tmp_path / "c")
    status = Checkpoint(a=Variable(0.0)).read(path)
    assert status.assert_existing_objects_matched() is status
    with pytest.raises(AssertionError, match="Unresolved"):
        status.assert_consumed()
    status.expect_partial()


def test_read_does_not_expect_save_counter_but_restore_does(tmp_path: Path) -> None:
    # A checkpoint without save_counter, as another tool would write it: a plain Trackable root.
    from cloudckpt.coordination import LocalCoordinator
    from cloudckpt.object_graph import collect
    from cloudckpt.saving import save
    from cloudckpt.storage import resolve

    root = Trackable()
    root.a = Variable(1.0)
    save(LocalCoordinator(), resolve(tmp_path / "foreign"), collect(root))
    Checkpoint(a=Variable(0.0)).read(tmp_path / "foreign").assert_consumed()
    status = Checkpoint(a=Variable(0.0)).restore(tmp_path / "foreign")
    with pytest.raises(AssertionError, match="save_counter"):
        status.assert_existing_objects_matched()
    # Our own write() stores save_counter, so restore() of a written path is consumed too.
    Checkpoint(a=Variable(1.0)).write(tmp_path / "c")
    Checkpoint(a=Variable(0.0)).restore(tmp_path / "c").assert_consumed()


def test_nontrivial_match_fails_when_nothing_matches(tmp_path: Path) -> None:
    path = Checkpoint(a=Variable(1.0)).write(tmp_path / "c")
    status = Checkpoint(other=Variable(0.0)).restore(path)
    with pytest.raises(AssertionError, match="Nothing except the root"):
        status.assert_nontrivial_match()
    status.expect_partial()


def test_unused_values_warn_when_status_discarded(tmp_path: Path) -> None:
    path = Checkpoint(a=Variable(1.0), b=Variable(2.0)).write(tmp_path / "c")
    with pytest.warns(UserWarning, match="'b'"):
        Checkpoint(a=Variable(0.0)).read(path)
        gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Checkpoint(a=Variable(0.0)).read(path).expect_partial()
        gc.collect()
        Checkpoint(a=Variable(0.0), b=Variable(0.0)).read(path)
        gc.collect()


def test_run_restore_ops_and_initialize_or_restore_are_eager_noops(tmp_path: Path) -> None:
    path = Checkpoint(a=Variable(1.0)).write(tmp_path / "c")
    a = Variable(0.0)
    status = Checkpoint(a=a).restore(path)
    assert status.run_restore_ops() is None
    status.initialize_or_restore()
    assert float(a) == 1.0


# ---------------------------------------------------------------------- deferred restoration
def test_deferred_restoration_on_attach(tmp_path: Path) -> None:
    model = Model(seed=5)
    path = Checkpoint(model=model, step=Variable(3)).save(tmp_path / "ckpt")
    ckpt = Checkpoint()
    status = ckpt.restore(path)
    with pytest.raises(AssertionError, match="model"):
        status.assert_consumed()
    status.assert_existing_objects_matched()
    ckpt.model = Model(seed=6)
    ckpt.step = Variable(0)
    np.testing.assert_array_equal(ckpt.model.layers[1].kernel.numpy(), model.layers[1].kernel.numpy())
    assert int(ckpt.step) == 3
    status.assert_consumed()


def test_deferred_restoration_nested(tmp_path: Path) -> None:
    class Lazy(Trackable):
        def build(self) -> None:
            self.w = Variable(np.zeros(4))

    source = Lazy()
    source.build()
    source.w.assign(np.arange(4.0))
    path = Checkpoint(net=source).write(tmp_path / "c")
    target = Lazy()
    status = Checkpoint(net=target).read(path)
    target.build()  # created after the restore: restored on creation
    np.testing.assert_array_equal(target.w.numpy(), np.arange(4.0))
    status.assert_consumed()


def test_deferred_mismatch_raises_on_attach(tmp_path: Path) -> None:
    path = Checkpoint(v=Variable(np.ones(3))).write(tmp_path / "c")
    ckpt = Checkpoint()
    ckpt.read(path).expect_partial()
    with pytest.raises(CheckpointMismatchError):
        ckpt.v = Variable(np.zeros(2))


# ---------------------------------------------------------------------- on-store objects
def test_rewrite_replaces_index_and_deletes_old_data_after(tmp_path: Path) -> None:
    ckpt = Checkpoint(v=Variable(np.ones(4)))
    ckpt.write(tmp_path / "c")
    first = data_objects(tmp_path, "c")
    assert len(first) == 1 and first[0].startswith("c.data-00000-of-00001.")
    ckpt.v.assign(np.full(4, 2.0))
    ckpt.write(tmp_path / "c")
    second = data_objects(tmp_path, "c")
    assert len(second) == 1 and second != first
    restored = Variable(np.zeros(4))
    Checkpoint(v=restored).read(tmp_path / "c").assert_consumed()
    assert (restored.numpy() == 2).all()


def test_failed_data_upload_leaves_no_checkpoint(tmp_path: Path) -> None:
    store = FaultyStorage(tmp_path)
    install(store)
    try:
        ckpt = Checkpoint(v=Variable(np.ones(4)))
        store.fail_put = lambda key: ".data-" in key
        with pytest.raises(cloudckpt.errors.TransientError):
            ckpt.write(tmp_path / "c")
        assert not (tmp_path / "c.index").exists()
        assert data_objects(tmp_path, "c") == []
    finally:
        uninstall(store)


def test_concurrent_writer_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer commits between our HEAD and our PUT: we lose cleanly, they stay intact."""
    from cloudckpt.storage import Storage

    ours = Checkpoint(v=Variable(np.ones(2)))
    theirs = Checkpoint(v=Variable(np.full(2, 7.0)))
    real_head = Storage.head
    fired = []

    def head_then_race(self: Storage, key: str) -> object:
        result = real_head(self, key) if (tmp_path / key).exists() else None
        if not fired:
            fired.append(True)
            theirs.write(tmp_path / "c")
        if result is None:
            raise NotFoundError("absent", key)
        return result

    monkeypatch.setattr(Storage, "head", head_then_race)
    with pytest.raises(ConcurrentWriterError):
        ours.write(tmp_path / "c")
    monkeypatch.undo()
    restored = Variable(np.zeros(2))
    Checkpoint(v=restored).read(tmp_path / "c").assert_consumed()
    assert (restored.numpy() == 7).all()
    assert len(data_objects(tmp_path, "c")) == 1


def test_reading_one_variable_fetches_only_its_bytes(tmp_path: Path) -> None:
    store = FaultyStorage(tmp_path)
    install(store)
    try:
        big = {f"a{i}": np.full(1000, i, np.float64) for i in range(20)}
        path = Checkpoint(big=big).write(tmp_path / "c")
        store.read_keys.clear()
        value = cloudckpt.load_variable(path, "big/a7")
        assert (value == 7).all()
        assert len(store.read_keys) == 1
        reader = cloudckpt.load_checkpoint(path)
        assert reader.get_variable_to_shape_map()["big/a3"] == [1000]
        assert reader.get_variable_to_dtype_map()["big/a3"] == np.float64
        assert reader.has_tensor("big/a3") and not reader.has_tensor("nope")
        with pytest.raises(KeyError):
            reader.get_tensor("nope")
    finally:
        uninstall(store)


def test_subtree_restore_reads_only_the_subtree(tmp_path: Path) -> None:
    store = FaultyStorage(tmp_path)
    install(store)
    try:
        path = Checkpoint(model=Model(seed=1), other={"x": np.ones(10**5)}).write(tmp_path / "c")
        store.read_bytes = 0
        fresh = Model(seed=9)
        Checkpoint(model=fresh).read(path).expect_partial()
        # two kernels, two biases and save_counter; not the 800 kB of "other"
        assert store.read_bytes == (12 + 4 + 8 + 2) * 4 + 8
    finally:
        uninstall(store)


def test_pathlike_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpoint(v=Variable(1.0))
    path = ckpt.save("ckpt")
    assert path == "ckpt-1" and os.path.exists("ckpt-1.index")
    ckpt.restore(path).assert_consumed()


def test_options_are_accepted_by_every_method(tmp_path: Path) -> None:
    options = CheckpointOptions(experimental_io_device="/job:localhost")
    ckpt = Checkpoint(v=Variable(1.0))
    path = ckpt.save(tmp_path / "c", options=options)
    ckpt.write(tmp_path / "w", options=options)
    ckpt.restore(path, options=options).assert_consumed()
    ckpt.read(path, options=options).assert_consumed()


def test_small_adjacent_reads_are_coalesced(tmp_path: Path) -> None:
    store = FaultyStorage(tmp_path)
    install(store)
    try:
        arrays = {f"a{i:03d}": np.full(10, i, np.int32) for i in range(100)}
        path = Checkpoint(arrays=arrays).write(tmp_path / "c")
        gets: list[int] = []
        plain = store._read_into

        def counted(full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
            gets.append(len(outs))
            plain(full_key, offset, outs)

        store._read_into = counted  # type: ignore[method-assign]
        target = {k: np.zeros(10, np.int32) for k in arrays}
        Checkpoint(arrays=target).read(path).assert_consumed()
        assert gets == [101]  # one read of the data object, straight into the 100 arrays and the save counter
        assert all((target[k] == v).all() for k, v in arrays.items())
    finally:
        uninstall(store)


@pytest.mark.parametrize("split", ["rows", "columns"])
def test_sharded_array_entries_are_assembled(tmp_path: Path, split: str) -> None:
    """Chunks with offsets into a global array (as multi-host saves write them)."""
    from cloudckpt.format import ArrayEntry, CheckpointIndex, Chunk, DataObject, NodeEntry, data_key
    from cloudckpt.saving.commit import commit
    from cloudckpt.storage import resolve
    from cloudckpt.storage.checksum import crc32c_of

    full = np.arange(24, dtype=np.float64).reshape(4, 6)
    if split == "rows":
        boxes = [((0, 0), full[:1]), ((1, 0), full[1:])]
    else:
        boxes = [((0, 0), full[:, :2]), ((0, 2), full[:, 2:])]
    location = resolve(tmp_path / "sharded")
    storage, name = location.storage, location.name
    key = data_key(name, 0, 1, "abc123")
    pieces = [np.ascontiguousarray(b) for _, b in boxes]
    storage.put(key, [p.tobytes() for p in pieces])
    chunks, offset = [], 0
    for (start, _), piece in zip(boxes, pieces, strict=True):
        chunks.append(Chunk(0, offset, piece.nbytes, crc32c_of([piece.tobytes()]), start, piece.shape))
        offset += piece.nbytes
    entries = {"": NodeEntry("object", ("w",)), "w": ArrayEntry("float64", (4, 6), "ndarray", tuple(chunks))}
    commit(storage, CheckpointIndex(name, entries, (DataObject(key, offset),)), None)
    np.testing.assert_array_equal(cloudckpt.load_variable(tmp_path / "sharded", "w"), full)
    target = np.zeros((4, 6))
    Checkpoint(w=target).read(tmp_path / "sharded").assert_consumed()
    np.testing.assert_array_equal(target, full)


def test_latest_checkpoint_finds_plain_saves(tmp_path: Path) -> None:
    ckpt = Checkpoint(v=Variable(1.0))
    assert cloudckpt.latest_checkpoint(tmp_path) is None
    ckpt.save(tmp_path / "ckpt")
    last = ckpt.save(tmp_path / "ckpt")
    assert cloudckpt.latest_checkpoint(tmp_path) == last
    Checkpoint(v=Variable(0.0)).restore(cloudckpt.latest_checkpoint(tmp_path)).assert_consumed()


def test_import_stays_light() -> None:
    import subprocess
    import sys

    code = ("import sys, cloudckpt; "
            "print(sorted(m for m in ('torch', 'boto3', 'google.cloud.storage') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_new_restore_drops_deferred_values_of_an_earlier_one(tmp_path: Path) -> None:
    first = Checkpoint(v=Variable(1.0)).write(tmp_path / "first")
    second = Checkpoint(w=Variable(2.0)).write(tmp_path / "second")
    ckpt = Checkpoint()
    ckpt.read(first).expect_partial()
    ckpt.read(second).expect_partial()
    ckpt.v = Variable(0.0)
    assert float(ckpt.v) == 0.0  # not restored from the first checkpoint any more
    ckpt.w = Variable(0.0)
    assert float(ckpt.w) == 2.0


def test_after_commit_hook_gets_what_was_written(tmp_path: Path) -> None:
    seen = []
    ckpt = Checkpoint(v=Variable(np.ones(3)))
    ckpt._write_managed(tmp_path / "c", after_commit=seen.append, metadata={"step": 5, "loss": 0.5})
    (written,) = seen
    assert written.name == "c" and written.index_version
    assert [Path(tmp_path / k).exists() for k in written.data_keys] == [True]
    assert cloudckpt.load_checkpoint(tmp_path / "c").metadata == {"step": 5, "loss": 0.5}


def test_restore_a_subtree_into_another_object(tmp_path: Path) -> None:
    source = Model(seed=1)
    path = Checkpoint(model=source, other=np.ones(5)).write(tmp_path / "c")
    layer = Dense(3, 4, seed=7)
    cloudckpt.load_checkpoint(path).restore("model/layers/0", layer)
    np.testing.assert_array_equal(layer.kernel.numpy(), source.layers[0].kernel.numpy())
    with pytest.raises(CheckpointMismatchError):
        cloudckpt.load_checkpoint(path).restore("model/layers/1", Dense(3, 4))


def test_deferred_plain_values_take_the_stored_value(tmp_path: Path) -> None:
    ckpt = Checkpoint()
    ckpt.epoch = 3
    path = ckpt.save(tmp_path / "ckpt")
    fresh = Checkpoint()
    status = fresh.restore(path)
    fresh.epoch = 0  # created after the restore, like a variable: it takes the checkpoint's value
    assert fresh.epoch == 3
    status.assert_consumed()


def test_index_committed_by_another_writer_during_upload_is_not_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index is HEADed before the data upload, so a rival commit in that window wins."""
    from cloudckpt.saving import pipeline

    rival = Checkpoint(v=Variable(np.full(4, 7.0)))
    real_upload = pipeline.upload

    def upload_while_rival_commits(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(pipeline, "upload", real_upload)
        rival.write(tmp_path / "shared")  # lands while our bytes are "in flight"
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(pipeline, "upload", upload_while_rival_commits)
    with pytest.raises(ConcurrentWriterError):
        Checkpoint(v=Variable(np.zeros(4))).write(tmp_path / "shared")
    target = Variable(np.zeros(4))
    Checkpoint(v=target).read(tmp_path / "shared").assert_consumed()
    np.testing.assert_array_equal(target.numpy(), np.full(4, 7.0))


@pytest.mark.parametrize("method", ["assign", "assign_add", "assign_sub"])
def test_int_variable_refuses_floats_in_every_assign(method: str) -> None:
    """``assign(2.5)`` raised while ``assign_add(1.7)`` truncated silently; now all three agree."""
    step = Variable(np.int64(3), name="step")
    with pytest.raises(TypeError, match=rf"cannot {method} a float64 value to Variable 'step' of dtype int64"):
        getattr(step, method)(2.5 if method == "assign" else 1.7)
    assert int(step) == 3 and step.dtype == np.int64
    getattr(step, method)(2)  # same kind: fine
    assert int(step) == {"assign": 2, "assign_add": 5, "assign_sub": 1}[method]
    weights = Variable(np.zeros(2, np.float32))
    getattr(weights, method)(np.ones(2))  # float64 into float32: same kind, as tf.Variable allows
    assert weights.dtype == np.float32
