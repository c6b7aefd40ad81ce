"""torch.distributed.checkpoint (DCP) on cloudckpt: ``cloudckpt.dcp`` against real servers and real gloo groups.

One spawn of 2 gloo processes (tests/dcp_worker.py) runs every multi-process scenario on
SeaweedFS and fake-gcs-server: DTensor + optimizer state saved, loaded onto other
placements, async_save, overwrite refusal, a failing rank, the manager round trip, and a
SIGKILL mid-save. This process then loads those checkpoints without a process group,
reads them as ordinary cloudckpt checkpoints (reader, CLI), scans every stored object for
pickle streams, and lets the next manager save clean up after the killed one. The
in-process tests cover the codecs, the format additions and single-process DCP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import dcp_worker
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import cloudckpt
from cloudckpt import CheckpointManager, CheckpointOptions
from cloudckpt.cli import main as cli_main
from cloudckpt.coordination import LocalCoordinator
from cloudckpt.dcp import DCPCheckpoint, StorageReader, StorageWriter
from cloudckpt.dcp import reader as reader_module
from cloudckpt.dcp import writer as dcp_writer_module
from cloudckpt.dcp.metadata import decode_metadata
from cloudckpt.dcp.plain import decode_plain, encode_plain
from cloudckpt.errors import (
    AfterCommitError,
    AlreadyExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    ChecksumError,
    ConcurrentWriterError,
    DistributedSaveError,
    SaveError,
)
from cloudckpt.format import FORMAT_VERSION, ArrayEntry, CheckpointIndex, decode_index, encode_index, index_key
from cloudckpt.format.index_fetch import load_index
from cloudckpt.format.state_file import STATE_KEY, parse
from cloudckpt.restoring.buffers import CHECK_BEFORE_ALLOCATING
from cloudckpt.storage import Location, Storage, resolve
from cloudckpt.storage.local import LocalStorage
from cloudckpt.testing.processes import spawn_reports

SPAWN_TIMEOUT = 300.0
PICKLE_STARTS = tuple(bytes([0x80, p]) for p in range(2, 6))
ZIP_START = b"PK\x03\x04"

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is")


def storage_of(root: str) -> Storage:
    return resolve(f"{root}/x").storage


# ---------------------------------------------------------------------------- the 2-process spawn
@pytest.fixture(scope="module")
def gcs_root(gcs_bucket: str) -> str:
    return f"gs://{gcs_bucket}/run-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def ranks(s3_root: str, gcs_root: str) -> list[dict[str, Any]]:
    """Both ranks' reports; rank 1 is SIGKILLed by the last scenario, so its report is rank 0's ``peer``."""
    reports = spawn_reports(dcp_worker.two_ranks, 2, s3_root, gcs_root, timeout=SPAWN_TIMEOUT, may_die={1})
    assert reports[1].get("died") == -9, reports[1]
    return [reports[0], reports[0]["peer"]]


def test_dtensor_and_optimizer_state_reshard_bit_exact_on_two_ranks(ranks: list[dict[str, Any]]) -> None:
    """Saved as Shard(0) on 2 ranks; loaded as Shard(1) and Replicate() on both backends, and after async_save."""
    for report in ranks:
        assert report["problems"] == []
    assert ranks[0]["digests"] == ranks[1]["digests"]  # both ranks saw the same global state
    digests = ranks[0]["digests"]
    assert {"params.W", "params.R", "params.B", "model.0.weight", "optim.state.0.weight.exp_avg",
            "optim.state.1.bias.exp_avg_sq", "optim.state.0.weight.step"} <= digests.keys()


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_a_dcp_checkpoint_is_an_ordinary_cloudckpt_checkpoint(ranks: list[dict[str, Any]], s3_root: str,
                                                              gcs_root: str, backend: str) -> None:
    path = f"{s3_root if backend == 's3' else gcs_root}/ck-1"
    bump = 2 if backend == "s3" else 0  # the s3 one was overwritten by scenario 4
    location = resolve(path)
    index = load_index(location.storage, location.name)
    w = index.entries["params.W"]
    assert isinstance(w, ArrayEntry) and w.pytype == "tensor" and w.shape == (8, 6)
    assert [(c.start, c.shape) for c in w.chunks] == [((0, 0), (4, 6)), ((4, 0), (4, 6))]  # one chunk per DCP chunk
    assert len({o.name.rsplit(".", 1)[1] for o in index.objects}) == 1 and len(index.objects) == 2  # one per rank
    byte_items = sorted(p for p, e in index.entries.items() if isinstance(e, ArrayEntry) and e.pytype == "bytes")
    assert byte_items == ranks[0]["byte_items"]
    assert index.dcp is not None and index.dcp["tensors"]["params.B"] == {"dtype": "int64", "requires_grad": False}
    assert torch.equal(cloudckpt.load_variable(path, "params.W"), torch.from_numpy(dcp_worker.global_w(bump)))
    step = cloudckpt.load_variable(path, "step")
    assert isinstance(step, bytes) and step.startswith(ZIP_START)  # DCP's serialized int, handed back as is
    exp_avg = cloudckpt.CheckpointReader(path).get_tensor("optim.state.0.weight.exp_avg")
    assert dcp_worker.digest(exp_avg) == ranks[0]["digests"]["optim.state.0.weight.exp_avg"]


def test_load_without_a_process_group(ranks: list[dict[str, Any]], gcs_root: str) -> None:
    """The 2-rank checkpoint into one process: every tensor bit-exact, nesting rebuilt from planner_data."""
    loaded = _load_state_dict_from_keys(storage_reader=StorageReader(f"{gcs_root}/ck-1"))
    assert dcp_worker.full_digests(loaded) == ranks[0]["digests"]
    assert loaded["step"] == 5 and loaded["extra"] == {"epoch": 2, "tags": ["a", "b"]}
    assert isinstance(loaded["optim"]["param_groups"], list)  # a list again, via the tagged planner_data


def test_async_save_stored_the_staged_values(ranks: list[dict[str, Any]], s3_root: str) -> None:
    assert "async" not in " ".join(ranks[0]["problems"])
    w = cloudckpt.load_variable(f"{s3_root}/ck-async", "params.W")
    assert torch.equal(w, torch.from_numpy(dcp_worker.global_w(1)))  # not the +100 written after async_save returned


def test_async_save_in_dcps_checkpoint_process(ranks: list[dict[str, Any]], s3_root: str) -> None:
    """AsyncCheckpointerType.PROCESS: each rank's writer crossed into torch's checkpoint process (pickled
    as its URL), which saved both ranks' shards into one checkpoint, twice; both load bit-exact."""
    for report in ranks:
        assert [p for p in report["problems"] if "process async" in p] == []
    urls = [f"{s3_root}/proc/ck-1", f"{s3_root}/proc/ck-2"]
    assert ranks[0]["process_async"] == ranks[1]["process_async"] == urls
    for bump, url in enumerate(urls, start=3):
        assert torch.equal(cloudckpt.load_variable(url, "params.W"), torch.from_numpy(dcp_worker.global_w(bump)))
        location = resolve(url)
        assert len(load_index(location.storage, location.name).objects) == 2  # one data object per rank


def test_committed_checkpoint_is_kept_unless_overwrite(ranks: list[dict[str, Any]]) -> None:
    for report in ranks:
        refused = report["refused"]
        assert refused is not None and refused["types"] == {"0": "AlreadyExistsError"}
        assert "overwrite=True" in refused["message"]
    before, after = ranks[0]["before_overwrite"], ranks[0]["after_overwrite"]
    assert "ck-1.index" in before and "ck-1.index" in after
    old = {k for k in before if ".data-" in k}
    new = {k for k in after if ".data-" in k}
    assert old and new and not old & new  # new objects under a new suffix; the replaced ones deleted


def test_a_failing_rank_leaves_no_index_and_no_data(ranks: list[dict[str, Any]], s3_root: str) -> None:
    for report in ranks:
        failure = report["failure"]
        assert failure is not None and failure["ranks"] == [1], failure
        assert "injected failure: disk on fire" in failure["message"]
    assert [m.key for m in storage_of(s3_root).list("ck-fail")] == []  # rank 0 removed its uploaded objects too


def test_manager_round_trip_with_retention_preemption_and_fencing(ranks: list[dict[str, Any]], s3_root: str) -> None:
    managed = f"{s3_root}/managed"
    for report in ranks:
        assert report["managed_initial"] is None
        assert report["managed_saved"] == [f"{managed}/ckpt-{i}" for i in (1, 2, 3)]  # the 3rd one async
        assert report["managed_checkpoints"] == [f"{managed}/ckpt-2", f"{managed}/ckpt-3"]
        assert report["managed_latest"] == f"{managed}/ckpt-3"
        assert report["managed_resumed"] == f"{managed}/ckpt-3" and report["managed_resumed_counter"] == 3
        assert report["managed_preempted_at"] == 2 and report["managed_exits"] == 1  # rank 1's notice, both saved
        assert report["managed_after_preemption"] == [f"{managed}/ckpt-3", f"{managed}/ckpt-4"]
        assert report["managed_fenced"] is not None and "another writer took over" in report["managed_fenced"]
    # The incremental save reads its base's index once (rank 0, then broadcast): rank 1 reads no index.
    assert [r["managed_incremental_index_requests"] for r in ranks] == [3, 0]  # base HEAD + GET, new index HEAD
    # DCPCheckpoint.restore loads on every rank together: rank 0 reads the index, rank 1 none.
    assert [r["managed_resume_index_requests"] for r in ranks] == [4, 0]  # rank 0: 2 to check it is intact, 2 to load
    storage = storage_of(managed)
    kept = [load_index(storage, name) for name in ("ckpt-3", "ckpt-4")]
    named = {o.name for index in kept for o in index.objects}
    left = {m.key for m in storage.list("ckpt-") if not m.key.startswith("ckpt-100.")}  # not the fencer's
    assert "ckpt-1.index" not in left and "ckpt-2.index" not in left  # evicted
    assert {k for k in left if ".data-" in k} == named  # what evicted ones wrote stays only while referenced
    # Incremental: R and B never changed, so every later save references the bytes the first one wrote.
    for index in kept:
        r = index.entries["params.R"]
        assert isinstance(r, ArrayEntry) and index.objects[r.chunks[0].object].name.startswith("ckpt-1.data-")
    assert kept[0].references and "ckpt-1" in kept[0].references
    state = parse(storage.get(STATE_KEY).decode(), "state")
    assert state.model_checkpoint_path == "ckpt-100"  # the other writer's; the fenced manager never overwrote it


def test_sigkill_mid_save_then_the_next_manager_save_cleans_up(ranks: list[dict[str, Any]], s3_root: str) -> None:
    killed = f"{s3_root}/killed"
    assert ranks[0]["killed_first"] == f"{killed}/ckpt-1"
    assert ranks[0]["killed_save"] is not None and "rank 0" in ranks[0]["killed_save"]
    storage = storage_of(killed)
    keys = [m.key for m in storage.list("")]
    assert "ckpt-2.index" not in keys
    orphans = [k for k in keys if k.startswith("ckpt-2.data-")]
    assert [k.split(".")[1] for k in orphans] == ["data-00001-of-00002"]  # rank 1's; rank 0 removed its own

    app: dict[str, Any] = {"params": {"W": torch.zeros(8, 6), "R": torch.zeros(5, 3, dtype=torch.float64),
                                      "B": torch.zeros(7, dtype=torch.int64)}}
    manager = CheckpointManager(DCPCheckpoint(app, coordinator=LocalCoordinator()), killed, max_to_keep=3,
                                leftover_min_age=0)
    assert manager.restore_or_initialize() == f"{killed}/ckpt-1"
    assert torch.equal(app["params"]["W"], torch.from_numpy(dcp_worker.global_w()))
    app["params"]["W"].add_(1)
    assert manager.save() == f"{killed}/ckpt-2"
    left = {m.key for m in storage.list("ckpt-2.data-")}
    index = load_index(storage, "ckpt-2")
    assert left == {o.name for o in index.owned_objects()} and not set(orphans) & left  # the crashed save's: gone
    assert torch.equal(cloudckpt.load_variable(f"{killed}/ckpt-2", "params.W"),
                       torch.from_numpy(dcp_worker.global_w(1)))


def test_cli_on_a_dcp_checkpoint(ranks: list[dict[str, Any]], gcs_root: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = f"{gcs_root}/ck-1"
    assert cli_main(["ls", gcs_root]) == 0
    assert "ck-1" in capsys.readouterr().out
    assert cli_main(["inspect", "--json", path]) == 0
    doc = json.loads(capsys.readouterr().out)
    entries = {e["key"]: e for e in doc["entries"]}
    assert doc["format_version"] == FORMAT_VERSION and len(entries["params.W"]["chunks"]) == 2
    assert entries["step"]["pytype"] == "bytes"
    assert cli_main(["verify", path]) == 0
    capsys.readouterr()
    copy = tmp_path / "copy"
    assert cli_main(["cp", path, str(copy)]) == 0
    dest: dict[str, Any] = {"params": {"W": torch.zeros(8, 6)}}
    dcp.load(dest, storage_reader=StorageReader(copy), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(dest["params"]["W"], torch.from_numpy(dcp_worker.global_w()))
    assert cli_main(["export", path, str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as exported:
        assert np.array_equal(exported["params.W"], dcp_worker.global_w())
        assert "step" not in exported.files  # an opaque byte item is not exported as an array


def _chunk_regions(index: CheckpointIndex) -> dict[int, list[tuple[int, int, str, str]]]:
    out: dict[int, list[tuple[int, int, str, str]]] = {}
    for path, entry in index.entries.items():
        if isinstance(entry, ArrayEntry):
            for c in entry.chunks:
                out.setdefault(c.object, []).append((c.offset, c.length, path, entry.pytype))
    return out


def test_no_object_holds_a_pickle_stream_of_ours(ranks: list[dict[str, Any]], s3_root: str, gcs_root: str) -> None:
    """Every byte of every stored object is a JSON index, a raw tensor chunk, or one of DCP's listed byte items."""
    checked = 0
    for root in (s3_root, gcs_root):
        storage = storage_of(root)
        for meta in storage.list(""):
            if not meta.key.endswith(".index"):
                continue
            prefix, _, file = meta.key.rpartition("/")
            sub = storage_of(f"{root}/{prefix}") if prefix else storage
            name = file[:-len(".index")]
            raw = sub.get(index_key(name))
            assert raw.startswith(b"{") and not raw.startswith(PICKLE_STARTS), meta.key
            index = decode_index(raw, name, meta.key)
            if index.dcp is None:
                continue  # the fencing writer's plain Checkpoint
            regions = _chunk_regions(index)
            owned = {o.name for o in index.owned_objects()}
            byte_items = set()
            for k, obj in enumerate(index.objects):
                data = sub.get(obj.name)
                assert not data.startswith(PICKLE_STARTS) and len(data) == obj.size
                position = 0
                for offset, length, path, pytype in sorted(regions.get(k, [])):
                    # An object this save wrote holds nothing but its chunks (a referenced one, an
                    # incremental save's base, also holds what its own save wrote).
                    assert offset == position or obj.name not in owned, (obj.name, path)
                    position = offset + length
                    piece = data[offset:offset + length]
                    if pytype == "bytes":
                        assert piece.startswith(ZIP_START)  # torch.save's zip: DCP's own item
                        byte_items.add(path)
                    else:
                        assert not piece.startswith((*PICKLE_STARTS, ZIP_START)), (obj.name, path)
                assert position == obj.size or obj.name not in owned
            if index.entries.keys() >= {"step", "name"}:
                assert sorted(byte_items) == ranks[0]["byte_items"]  # exactly DCP's non-tensor items
            checked += 1
    assert checked >= 6


# ---------------------------------------------------------------------------- one process, no process group
def _small_state() -> dict[str, Any]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 3,
            "half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}


def test_single_process_save_and_load_with_a_location(tmp_path: Path) -> None:
    storage = LocalStorage(str(tmp_path))
    state = _small_state()
    dcp.save(state, storage_writer=StorageWriter(Location(storage, "ck")), no_dist=True)
    dest = _small_state()
    for value in dest["model"].values():
        value.zero_()
    dest["half"].zero_()
    dest["step"] = 0
    dcp.load(dest, storage_reader=StorageReader("ck", storage=storage), no_dist=True)
    assert torch.equal(dest["model"]["weight"], state["model"]["weight"]) and dest["step"] == 3
    assert torch.equal(dest["half"], state["half"]) and dest["half"].dtype == torch.bfloat16
    assert torch.equal(dest["optim"]["state"][0]["exp_avg"], state["optim"]["state"][0]["exp_avg"])


def test_refused_overwrite_writes_nothing_and_overwrite_replaces_atomically(tmp_path: Path) -> None:
    state = _small_state()
    dcp.save(state, checkpoint_id=tmp_path / "ck", storage_writer=StorageWriter(), no_dist=True)
    before = sorted(p.name for p in tmp_path.glob("ck.*"))
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    assert isinstance(info.value.failures[0][0], AlreadyExistsError)
    assert sorted(p.name for p in tmp_path.glob("ck.*")) == before
    state["step"] = 4
    dcp.save(state, storage_writer=StorageWriter(tmp_path / "ck", overwrite=True), no_dist=True)
    after = sorted(p.name for p in tmp_path.glob("ck.*"))
    assert len(after) == 2 and not (set(before) - {"ck.index"}) & set(after)
    loaded = _load_state_dict_from_keys({"step"}, checkpoint_id=tmp_path / "ck", storage_reader=StorageReader())
    assert loaded == {"step": 4}


def test_load_reads_straight_into_the_tensors_and_checks_every_byte(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    state = _small_state()
    dcp.save(state, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    dest = _small_state()
    seen: list[Any] = []
    real = reader_module.read_arrays

    def spy(storage: Storage, index: Any, targets: Any, ranges: Any = None) -> None:
        seen.extend(targets)
        real(storage, index, targets, ranges)

    monkeypatch.setattr(reader_module, "read_arrays", spy)
    dcp.load(dest, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    tensors = {"model.weight": dest["model"]["weight"], "half": dest["half"],
               "optim.state.0.exp_avg": dest["optim"]["state"][0]["exp_avg"]}
    by_path = {t.path: t for t in seen}
    for fqn, tensor in tensors.items():  # read into the destination's own memory: no buffer, no copy
        target = by_path[fqn]
        assert target.live and target.dest.ctypes.data == tensor.data_ptr(), fqn
    assert torch.equal(dest["half"], state["half"])
    monkeypatch.setattr(reader_module, "read_arrays", real)
    location = resolve(tmp_path / "ck")
    index = load_index(location.storage, location.name)
    chunk = index.entries["model.weight"].chunks[0]  # type: ignore[union-attr]
    data = tmp_path / index.objects[chunk.object].name
    raw = bytearray(data.read_bytes())
    raw[chunk.offset + 1] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_small_state(), storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    assert isinstance(info.value.failures[0][0], ChecksumError) and "model.weight" in str(info.value)


class FailsIndexPut(LocalStorage):
    """A local store whose index PUT fails, as if the bucket refused the commit."""

    def put(self, key: str, data: Any, **kwargs: Any) -> Any:
        if key.endswith(".index"):
            raise OSError("injected: commit refused")
        return super().put(key, data, **kwargs)


def test_a_failed_commit_removes_the_data_objects(tmp_path: Path) -> None:
    storage = FailsIndexPut(str(tmp_path))
    with pytest.raises(CheckpointException, match="commit refused"):
        dcp.save(_small_state(), storage_writer=StorageWriter(Location(storage, "ck")), no_dist=True)
    assert not list(tmp_path.glob("ck*"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_rival_commit_during_the_upload_wins_and_the_loser_commits_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool) -> None:
    """The index is HEADed before the upload (prepare_global_plan), so a rival commit in that window wins.

    Mirrors test_checkpoint_api's test for ``Checkpoint.write``: the loser raises
    ``ConcurrentWriterError``, leaves the rival's checkpoint as it was and removes its own data.
    """
    if overwrite:  # replace-if-unchanged: a checkpoint is there already
        dcp.save(_small_state(), storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    rival = _small_state()
    rival["step"] = 7
    real_upload = dcp_writer_module.upload

    def upload_while_rival_commits(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(dcp_writer_module, "upload", real_upload)
        dcp.save(rival, storage_writer=StorageWriter(tmp_path / "ck", overwrite=True), no_dist=True)
        return real_upload(*args, **kwargs)

    monkeypatch.setattr(dcp_writer_module, "upload", upload_while_rival_commits)
    with pytest.raises(CheckpointException) as info:
        dcp.save(_small_state(), storage_writer=StorageWriter(tmp_path / "ck", overwrite=overwrite), no_dist=True)
    cause = info.value.failures[0][0]
    assert isinstance(cause, ConcurrentWriterError) and "was not committed" in str(cause)
    rival_files = sorted(o.name for o in load_index(resolve(tmp_path / "ck").storage, "ck").objects)
    assert sorted(p.name for p in tmp_path.glob("ck.*")) == sorted(["ck.index", *rival_files])  # ours are gone
    loaded = _load_state_dict_from_keys({"step"}, checkpoint_id=tmp_path / "ck", storage_reader=StorageReader())
    assert loaded == {"step": 7}


def test_the_committed_but_error_keeps_its_old_dcp_name() -> None:
    """One "committed, but ..." error (``AfterCommitError``); ``BookkeepingError`` names it for one release."""
    assert dcp_writer_module.BookkeepingError is AfterCommitError
    assert issubclass(AfterCommitError, DistributedSaveError) and AfterCommitError.committed


class FailsDataPuts(LocalStorage):
    """A local store whose data-object PUTs fail while ``failing`` is set."""

    failing = False

    def put(self, key: str, data: Any, **kwargs: Any) -> Any:
        if self.failing and ".data-" in key:
            raise OSError("injected: disk full")
        return super().put(key, data, **kwargs)


def test_manager_on_one_process_with_async_save_and_sync_reraising(tmp_path: Path) -> None:
    storage = FailsDataPuts(str(tmp_path))
    app = {"state": _small_state()}
    manager = CheckpointManager(DCPCheckpoint(app, coordinator=LocalCoordinator()), tmp_path, max_to_keep=1,
                                storage=storage)
    manager.save()
    app["state"]["step"] = 9
    written: list[str] = []
    manager.save(options=CheckpointOptions(enable_async=True, experimental_write_callbacks=[written.append]))
    manager.sync()
    assert written == [str(tmp_path / "ckpt-2")]
    assert manager.checkpoints == [str(tmp_path / "ckpt-2")] and not (tmp_path / "ckpt-1.index").exists()
    fresh = {"state": _small_state()}
    resumed = CheckpointManager(DCPCheckpoint(fresh, coordinator=LocalCoordinator()), tmp_path, max_to_keep=1)
    assert resumed.restore_or_initialize() == str(tmp_path / "ckpt-2")
    assert fresh["state"]["step"] == 9 and int(resumed.checkpoint.save_counter) == 2
    with pytest.raises(CheckpointNotFoundError):
        resumed.checkpoint.restore(tmp_path / "ckpt-9")
    storage.failing = True
    app["state"]["step"] = 10  # something to upload (an incremental save would reuse everything else)
    manager.save(options=CheckpointOptions(enable_async=True))
    with pytest.raises(SaveError, match="disk full"):
        manager.sync()
    assert manager.checkpoints == [str(tmp_path / "ckpt-2")] and not list(tmp_path.glob("ckpt-3*"))


def test_the_writer_crosses_into_another_process_as_its_url(s3_root: str, tmp_path: Path) -> None:
    """What AsyncCheckpointerType.PROCESS pickles: URL and options, no client, pool or lock - after a
    save built all of them; the copy reopens its storage and saves (the 2-rank spawn runs the real thing)."""
    import pickle

    from cloudckpt.coordination import LocalCoordinator as Local

    writer = StorageWriter(f"{s3_root}/crossing/ck-1", coordinator=Local())
    dcp.save({"w": torch.arange(6.0)}, storage_writer=writer, no_dist=True)
    clone = pickle.loads(pickle.dumps(writer))
    assert (clone.checkpoint_id, clone.overwrite) == (writer.checkpoint_id, False)
    dcp.save({"w": torch.arange(6.0) * 2}, storage_writer=StorageWriter(f"{s3_root}/crossing/ck-2", overwrite=True,
                                                                        coordinator=Local()), no_dist=True)
    clone = pickle.loads(pickle.dumps(StorageWriter(f"{s3_root}/crossing/ck-2", overwrite=True)))
    dcp.save({"w": torch.arange(6.0) * 3}, storage_writer=clone, no_dist=True)
    assert clone.overwrite and clone.last_commit is not None
    assert torch.equal(cloudckpt.load_variable(f"{s3_root}/crossing/ck-2", "w"), torch.arange(6.0) * 3)

    class Custom(Local):
        pass

    local = LocalStorage(str(tmp_path))
    for refused, reason in [(StorageWriter("ck", storage=local), "built in code"),
                            (StorageWriter(Location(local, "ck")), "built in code"),
                            (StorageWriter(str(tmp_path / "ck"), coordinator=Custom()), "Custom")]:
        with pytest.raises(TypeError, match=f"cannot be sent to DCP's checkpoint process.*{reason}"):
            pickle.dumps(refused)
    from cloudckpt.storage import register_storage, unregister_storage
    register_storage(local)
    try:
        with pytest.raises(TypeError, match="register_storage"):
            pickle.dumps(StorageWriter(str(tmp_path / "ck")))
    finally:
        unregister_storage(local)


# ---------------------------------------------------------------------------- codecs and format
def test_plain_codec_keeps_types() -> None:
    value = {"a": (1, "x", (2.5, None)), "b": [True, {"$k": 1}], "c": {0: "int key", (1, 2): "tuple key"},
             "n": float("nan"), "i": float("-inf")}
    doc = json.loads(json.dumps(encode_plain(value, "v"), allow_nan=False))
    back = decode_plain(doc, "v")
    assert back["a"] == (1, "x", (2.5, None)) and back["b"] == [True, {"$k": 1}]
    assert back["c"] == {0: "int key", (1, 2): "tuple key"} and np.isnan(back["n"]) and back["i"] == float("-inf")
    with pytest.raises(TypeError, match="without pickle"):
        encode_plain({"x": object()}, "planner_data")
    for bad in ({"$eval": "x"}, {"$float": "1e999"}, {"$dict": [[{"$list": []}, 1]]}, {"a": 1, "$b": 2}):
        with pytest.raises(CheckpointFormatError):
            decode_plain(bad, "v")
    deep: Any = 0
    for _ in range(100):
        deep = [deep]
    with pytest.raises(CheckpointFormatError, match="deeper"):
        decode_plain(deep, "v")


def _written(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    dcp.save(_small_state(), storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    path = tmp_path / "ck.index"
    return json.loads(path.read_text()), path


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["dcp"]["tensors"]["half"].update(dtype="os.system"), "bad torch dtype name"),
    (lambda d: d["dcp"]["tensors"]["half"].update(dtype="float32"), "stored as float32"),
    (lambda d: d["dcp"]["tensors"]["half"].update(dtype="manual_seed"), "not a torch dtype"),
    (lambda d: d["dcp"].update(pickled="gASV"), "unknown field"),
    (lambda d: d["dcp"].update(planner_data={"$pickle": "gASV"}), "unknown or malformed tagged"),
    (lambda d: d["dcp"]["tensors"].pop("half"), "no properties"),
    (lambda d: d["dcp"].update(save_counter=-1), "non-negative"),
])
def test_hostile_dcp_metadata_is_a_format_error(tmp_path: Path, mutate: Any, message: str) -> None:
    doc, path = _written(tmp_path)
    mutate(doc)
    index = decode_index(json.dumps(doc).encode(), "ck", str(path))
    with pytest.raises(CheckpointFormatError, match=message):
        decode_metadata(index, str(path))


def _load_failure(tmp_path: Path, dest: dict[str, Any]) -> BaseException:
    """The exception rank 0 raised inside ``dcp.load`` (DCP wraps it in a ``CheckpointException``)."""
    with pytest.raises(CheckpointException) as info:
        dcp.load(dest, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    return info.value.failures[0][0]


def test_a_byte_item_claiming_a_huge_size_is_refused_before_allocating(tmp_path: Path) -> None:
    """The index's recorded sizes lie too (1 TiB of 'step'): only the object's real size tells, before np.empty."""
    doc, path = _written(tmp_path)
    entry = doc["entries"]["step"]
    chunk = entry["chunks"][0]
    entry["shape"] = [2**40]
    chunk.update(length=2**40, shape=[2**40])
    chunk.pop("blocks", None)
    doc["objects"][chunk["object"]]["size"] = 2**41
    path.write_text(json.dumps(doc))
    error = _load_failure(tmp_path, _small_state())
    assert isinstance(error, CheckpointFormatError), repr(error)  # not a MemoryError
    assert re.search(r"cannot read 'step'.*has \d+ bytes.*nothing was allocated", str(error)), error


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claim=st.integers(1, 1 << 44))
@example(claim=1 << 40)
@example(claim=(1 << 24) + 1)
def test_a_byte_item_costs_memory_bounded_by_the_real_objects(tmp_path: Path, claim: int) -> None:
    """Whatever size the index claims for a byte item, loading takes at most ``CHECK_BEFORE_ALLOCATING`` (what a
    buffer may take before HEAD is asked) beyond memory proportional to the checkpoint's real bytes."""
    run = tmp_path / f"claim-{claim}"
    doc, path = _written(run)
    chunk = doc["entries"]["step"]["chunks"][0]
    doc["entries"]["step"]["shape"] = [claim]
    chunk.update(length=claim, shape=[claim])
    chunk.pop("blocks", None)
    doc["objects"][chunk["object"]]["size"] = max(doc["objects"][chunk["object"]]["size"], chunk["offset"] + claim)
    path.write_text(json.dumps(doc))
    real = sum(p.stat().st_size for p in run.glob("ck.*"))

    def load() -> BaseException | None:
        try:
            dcp.load(_small_state(), storage_reader=StorageReader(run / "ck"), no_dist=True)
        except CheckpointException as exc:
            return exc.failures[0][0]
        return None

    load()  # imports and caches: not the load's cost
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        error = load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(error, (CheckpointFormatError, ChecksumError)), repr(error)
    bound = CHECK_BEFORE_ALLOCATING + 64 * real + (1 << 20)
    assert peak <= bound, f"peak {peak} bytes for a {claim}-byte claim in {real} real bytes (bound {bound})"
    shutil.rmtree(run)


def test_a_truncated_data_object_names_the_item_and_the_real_size(tmp_path: Path) -> None:
    """Only 'b' is loaded, and its bytes lie past the truncated end: the error says where they are and what is there."""
    state = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}
    dcp.save(state, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    index = load_index(LocalStorage(str(tmp_path)), "ck")
    chunk = index.entries["b"].chunks[0]  # type: ignore[union-attr]
    data = tmp_path / index.objects[chunk.object].name
    data.write_bytes(data.read_bytes()[:100])
    error = _load_failure(tmp_path, {"b": torch.zeros(10)})
    assert isinstance(error, CheckpointFormatError), repr(error)
    message = str(error)
    assert "shorter than its index says" in message and "'b'" in message, message
    assert f"[{chunk.offset}, {chunk.offset + 40})" in message and "which has 100 bytes" in message, message
    assert f"ends at byte {chunk.offset}" not in message, message  # the object ends at byte 100


def test_format_version_2_additions_and_version_1_still_read(tmp_path: Path) -> None:
    doc, _ = _written(tmp_path)
    assert doc["version"] == FORMAT_VERSION and "dcp" in doc
    step = doc["entries"]["step"]
    assert step["pytype"] == "bytes" and step["dtype"] == "uint8"
    bad = json.loads(json.dumps(doc))
    bad["entries"]["step"]["dtype"] = "float32"
    bad["entries"]["step"]["chunks"][0]["shape"] = [step["shape"][0] // 4]
    bad["entries"]["step"]["shape"] = [step["shape"][0] // 4]
    with pytest.raises(CheckpointFormatError, match="1-D uint8"):
        decode_index(json.dumps(bad).encode(), "ck", "x")
    as_v1 = json.loads(json.dumps(doc))
    as_v1["version"] = 1
    for entry in as_v1["entries"].values():
        for chunk in entry.get("chunks", ()):
            chunk.pop("hash", None)  # version 2's content hashes (incremental saves)
    with pytest.raises(CheckpointFormatError, match=r"unknown field\(s\) \['dcp'\]"):
        decode_index(json.dumps(as_v1).encode(), "ck", "x")
    del as_v1["dcp"]
    with pytest.raises(CheckpointFormatError, match="needs format version 2"):
        decode_index(json.dumps(as_v1).encode(), "ck", "x")
    plain_v1 = CheckpointIndex("c", {"": cloudckpt.format.NodeEntry("object", ())}, ())
    raw = json.loads(encode_index(plain_v1))
    raw["version"] = 1
    assert decode_index(json.dumps(raw).encode(), "c", "x").version == 1  # version 1 stays readable
    raw["version"] = FORMAT_VERSION + 1  # a newer format than this reader knows
    with pytest.raises(CheckpointFormatError, match=f"format version {FORMAT_VERSION + 1}; this cloudckpt reads "
                                                    f"versions {', '.join(map(str, range(1, FORMAT_VERSION + 1)))}"):
        decode_index(json.dumps(raw).encode(), "c", "x")


def test_import_cloudckpt_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, cloudckpt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.stdout.strip() == "False"



def test_import_cloudckpt_dcp_without_torch_names_the_extra() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from cloudckpt.errors import MissingDependencyError\n"
            "try:\n    import cloudckpt.dcp\n"
            "except MissingDependencyError as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.stdout.startswith("MissingDependencyError"), out.stdout + out.stderr
    assert "pip install 'cloudckpt[torch]'" in out.stdout
