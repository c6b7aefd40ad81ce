"""``cloudckpt.tools``: each command's work called as a library function, its typed result checked.

The CLI tests (tests/test_cli*.py) check the printed text and JSON; these check what the
functions return, which is what a script or a notebook uses.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import tf_bundle_writer as tfw

import cloudckpt.tools as tools
from cloudckpt import Checkpoint, CheckpointManager, Variable
from cloudckpt.errors import AlreadyExistsError, CheckpointNotFoundError, ChecksumError
from cloudckpt.format.index_fetch import load_index
from cloudckpt.storage import open_storage
from cloudckpt.storage.base import TEMP_PREFIX


def _run(directory: Path, saves: int) -> str:
    """A managed directory with ``saves`` checkpoints of a few arrays."""
    state = {"w": np.arange(1000, dtype=np.float32), "ids": np.arange(7, dtype=np.int64)}
    ckpt = Checkpoint(model=state, step=Variable(0))
    manager = CheckpointManager(ckpt, str(directory), max_to_keep=5)
    for i in range(1, saves + 1):
        state["w"] += 1
        ckpt.step.assign(i)
        manager.save()
    manager.close()
    return str(directory)


def _flip(directory: Path, name: str, at: int) -> str:
    """Flip one byte of checkpoint ``name``'s (single) data object; returns its name."""
    (obj,) = load_index(open_storage(str(directory)), name).objects
    path = directory / obj.name
    content = bytearray(path.read_bytes())
    content[at] ^= 0x01
    path.write_bytes(bytes(content))
    return obj.name


# ---------------------------------------------------------------------------- verify
def test_verify_a_directory_reports_each_checkpoint_typed(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 2)
    report = tools.verify(run)
    assert isinstance(report, tools.VerifyReport) and report.intact
    assert [c.name for c in report.checkpoints] == ["ckpt-1", "ckpt-2"]
    assert all(c.intact and c.findings == () and c.arrays >= 2 and c.bytes > 4000 for c in report.checkpoints)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.checkpoints[0].bytes = 0  # type: ignore[misc]
    assert [c.name for c in tools.verify(run, latest=True).checkpoints] == ["ckpt-2"]


def test_verify_names_the_damaged_key_and_object(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 2)
    damaged_object = _flip(tmp_path / "run", "ckpt-1", 100)  # inside model/w, the first array written
    report = tools.verify(run)
    assert not report.intact
    (verdict,) = report.damaged
    assert verdict.name == "ckpt-1"
    (finding,) = verdict.findings
    assert isinstance(finding, tools.Finding)
    assert (finding.kind, finding.key, finding.object) == ("crc-mismatch", "model/w", damaged_object)
    assert "CRC32C mismatch" in finding.detail
    one = tools.verify_checkpoint(open_storage(run), "ckpt-1")
    assert one.findings == verdict.findings


def test_verify_an_empty_directory_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoints under"):
        tools.verify(str(tmp_path / "empty"))


def test_verify_reports_progress_to_the_callers_sink(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 1)
    seen: list[tuple[str, int, int]] = []

    class Sink:
        def __init__(self, total: int, description: str) -> None:
            self.total, self.description, self.done = total, description, 0

        def update(self, nbytes: int) -> None:
            self.done += nbytes

        def close(self) -> None:
            seen.append((self.description, self.total, self.done))

    (verdict,) = tools.verify(run, progress=Sink).checkpoints
    assert seen == [("verify ckpt-1", verdict.bytes, verdict.bytes)]


# ---------------------------------------------------------------------------- gc
def test_gc_dry_run_lists_what_it_would_delete_and_deletes_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 1)
    storage = open_storage(run)
    storage.put("ckpt-9.data-00000-of-00001.abcdefabcdefabcd", b"x" * 1000)
    storage.put(f"{TEMP_PREFIX}deadbeef/part-000000.cloudckpt-tmp", b"y" * 100)

    assert tools.collect_garbage(run, timedelta(days=1)).leftovers == ()  # too young
    dry = tools.collect_garbage(run, timedelta(0))
    assert isinstance(dry, tools.GcReport) and dry.dry_run and dry.removal is None
    assert {(item.kind, item.key) for item in dry.leftovers} == {
        ("unreferenced-data", "ckpt-9.data-00000-of-00001.abcdefabcdefabcd"),
        ("temporary", f"{TEMP_PREFIX}deadbeef/part-000000.cloudckpt-tmp")}
    assert dry.known_bytes == 1100
    assert storage.exists("ckpt-9.data-00000-of-00001.abcdefabcdefabcd")

    done = tools.collect_garbage(run, timedelta(0), delete=True)
    assert not done.dry_run and done.removal is not None
    assert (done.removal.removed, done.removal.bytes, done.failed_urls) == (2, 1100, ())
    assert not storage.exists("ckpt-9.data-00000-of-00001.abcdefabcdefabcd")
    assert tools.verify(run).intact  # the committed checkpoint is untouched


# ---------------------------------------------------------------------------- inspect
def test_inspect_checkpoint_returns_the_index_and_small_scalars(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 2)
    info = tools.inspect_checkpoint(f"{run}/ckpt-2")
    assert isinstance(info, tools.CheckpointInfo)
    assert (info.name, info.url) == ("ckpt-2", open_storage(run).url_for("ckpt-2"))
    assert set(info.leaves) == {"model/w", "model/ids", "step", "save_counter"}
    assert dict(info.values) == {"step": 2, "save_counter": 2}
    assert info.data_bytes == info.new_bytes > 4000 and info.shared_bytes == {}
    assert info.to_json()["entries"][0]["key"] in info.leaves
    assert tools.inspect_checkpoint(f"{run}/ckpt-2", values=False).values == {}


def test_inspect_checkpoint_of_a_tensorflow_bundle(tmp_path: Path) -> None:
    writer = tfw.BundleWriter()
    writer.add_array("step", 9, np.array(7, dtype=np.int64))
    writer.add_array("w", 1, np.arange(4, dtype=np.float32))
    writer.write(tmp_path, "tf")
    info = tools.inspect_checkpoint(tmp_path / "tf")
    assert isinstance(info, tools.BundleInfo)
    assert [t.name for t in info.tensors] == ["step", "w"] and dict(info.values) == {"step": 7}
    assert info.to_json()["format"] == "tensorflow"


def test_inspect_a_missing_checkpoint_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        tools.inspect_checkpoint(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------- ls
def test_list_checkpoints_returns_typed_rows(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 2)
    open_storage(run).put("ckpt-3.data-00000-of-00001.0123456789abcdef", b"a crashed save")
    listing = tools.list_checkpoints(run)
    assert isinstance(listing, tools.DirectoryListing)
    assert listing.latest == "ckpt-2" and listing.state_file and listing.subdirectories == ()
    rows = {row.name: row for row in listing.checkpoints}
    assert {n: r.status for n, r in rows.items()} == {"ckpt-1": "committed", "ckpt-2": "committed",
                                                     "ckpt-3": "incomplete"}
    assert rows["ckpt-2"].latest and rows["ckpt-2"].managed and not rows["ckpt-1"].latest
    assert rows["ckpt-2"].number == 2 and rows["ckpt-2"].objects == 2
    assert rows["ckpt-3"].size == len(b"a crashed save")
    assert listing.stored_bytes == sum(r.size for r in listing.checkpoints)
    (tmp_path / "empty").mkdir()
    assert tools.list_checkpoints(str(tmp_path / "empty")).checkpoints == ()


# ---------------------------------------------------------------------------- copy
def test_copy_a_directory_reports_each_checkpoint_and_skips_the_damaged(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 2)
    _flip(tmp_path / "run", "ckpt-1", 100)
    heard: list[str] = []
    report = tools.copy(run, str(tmp_path / "copy"), on_copied=lambda c: heard.append(c.dst),
                        on_damaged=lambda d: heard.append(d.name))
    assert isinstance(report, tools.CopyReport) and report.directory and not report.complete
    (done,) = report.copied
    assert isinstance(done, tools.Copied) and done.verified and done.objects == 1
    assert done.dst == open_storage(str(tmp_path / "copy")).url_for("ckpt-2")
    (damaged,) = report.damaged
    assert damaged.name == "ckpt-1" and "model/w" in damaged.reason
    assert heard == ["ckpt-1", done.dst]
    assert report.state_copied and tools.verify(str(tmp_path / "copy")).intact
    assert [c.name for c in tools.list_checkpoints(str(tmp_path / "copy")).checkpoints] == ["ckpt-2"]


def test_copy_one_checkpoint_refuses_an_existing_destination(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 1)
    report = tools.copy(f"{run}/ckpt-1", str(tmp_path / "other" / "renamed"))
    assert not report.directory and report.complete and report.copied[0].dst.endswith("/renamed")
    assert tools.verify(str(tmp_path / "other" / "renamed")).intact
    with pytest.raises(AlreadyExistsError, match="already exists"):
        tools.copy(f"{run}/ckpt-1", str(tmp_path / "other" / "renamed"))
    assert tools.copy(f"{run}/ckpt-1", str(tmp_path / "other" / "renamed"), force=True).complete


# ---------------------------------------------------------------------------- export
def test_export_writes_the_selected_arrays_and_reports_them(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 1)
    report = tools.export(f"{run}/ckpt-1", tmp_path / "out.npz", ["model"])
    assert isinstance(report, tools.ExportReport)
    assert (report.path, report.format, report.arrays, report.values) == (tmp_path / "out.npz", "cloudckpt", 2, 0)
    assert report.bytes == 1000 * 4 + 7 * 8 and report.skipped == ()
    with np.load(tmp_path / "out.npz") as npz:
        assert sorted(npz.files) == ["model/ids", "model/w"]
    with pytest.raises(FileExistsError):
        tools.export(f"{run}/ckpt-1", tmp_path / "out.npz")
    with pytest.raises(tools.NothingToExportError, match="'model/nope'"):
        tools.export(f"{run}/ckpt-1", tmp_path / "none.npz", ["model/nope"])
    assert not (tmp_path / "none.npz").exists()


def test_export_of_a_damaged_checkpoint_writes_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", 1)
    _flip(tmp_path / "run", "ckpt-1", 100)
    with pytest.raises(ChecksumError, match="nothing was written"):
        tools.export(f"{run}/ckpt-1", tmp_path / "bad.safetensors")
    assert list(tmp_path.glob("*.safetensors*")) == []
