"""The format sniffer and the reader seam: the core tells formats apart by bytes and never imports tfbundle."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import numpy as np
import pytest
import tf_bundle_writer as tfw

import cloudckpt
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import sniff
from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat, load_any_index, register_reader, sniff_index
from cloudckpt.storage.local import LocalStorage
from cloudckpt.tfbundle import Bundle, open_foreign

_CORE = ("checkpoint.py", "restoring/checkpoint_reader.py", "format/references.py", "manager/remove.py",
         "format/sniff.py")


@pytest.mark.parametrize("module", _CORE)
def test_the_core_does_not_import_the_tensorflow_reader(module: str) -> None:
    """Every import, at the top or inside a function (GUIDE 2: no cycles hidden by local imports)."""
    tree = ast.parse((Path(cloudckpt.__file__).parent / module).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("cloudckpt.tfbundle")}, imported


def test_sniff_tells_the_formats_apart_by_content() -> None:
    table = b"\0" * 40 + struct.pack("<Q", tfw.MAGIC)
    assert sniff_index(b'  {"format": "cloudckpt-index"}') is IndexFormat.CLOUDCKPT
    assert sniff_index(table) is IndexFormat.TENSORFLOW
    assert sniff_index(b"{" + table) is IndexFormat.CLOUDCKPT  # JSON first, whatever the tail
    assert sniff_index(table[1:]) is None  # shorter than a footer
    assert sniff_index(b"") is None


def test_a_tensorflow_checkpoint_reaches_the_core_through_its_registered_reader(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = tfw.BundleWriter()
    writer.add_array("w", 3, np.arange(3, dtype=np.int32))
    writer.write(tmp_path, "tf")
    storage = LocalStorage(str(tmp_path))
    found = load_any_index(storage, "tf")
    assert isinstance(found, ForeignCheckpoint) and isinstance(found.source, Bundle)
    assert found.format is IndexFormat.TENSORFLOW
    assert found.objects == frozenset(found.source.objects)
    np.testing.assert_array_equal(found.reader.get_tensor("w"), np.arange(3, dtype=np.int32))
    with pytest.raises(CheckpointFormatError, match="is a TensorFlow bundle; remove_checkpoint removes cloudckpt"):
        cloudckpt.remove_checkpoint(str(tmp_path / "tf"))
    assert (tmp_path / "tf.index").exists()
    monkeypatch.delitem(sniff._READERS, IndexFormat.TENSORFLOW)  # no reader: the core names the format, typed
    with pytest.raises(CheckpointFormatError, match="is a TensorFlow bundle, and no reader for it is registered"):
        load_any_index(storage, "tf")


def test_cloudckpt_reads_its_own_index_without_a_reader() -> None:
    with pytest.raises(ValueError, match="read by the core"):
        register_reader(IndexFormat.CLOUDCKPT, open_foreign)


def test_a_directory_layout_is_probed_by_its_marker_only_when_there_is_no_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch DCP and Orbax write a directory, not ``<name>.index``: the seam finds them by a marker object."""
    storage = LocalStorage(str(tmp_path))
    opened: list[str] = []

    restored: list[tuple[str, object]] = []

    class Reader:
        def restore(self, key: str, target: object) -> None:
            restored.append((key, target))

    def opener(found: object, name: str) -> ForeignCheckpoint:
        opened.append(name)
        return ForeignCheckpoint(IndexFormat.TORCH_DCP, name, frozenset(), Reader(), None)  # type: ignore[arg-type]

    monkeypatch.setattr(sniff, "_LAYOUTS", {})
    sniff.register_directory_reader(IndexFormat.TORCH_DCP, ".metadata", opener)
    with pytest.raises(cloudckpt.CheckpointNotFoundError):  # no index, no marker
        load_any_index(storage, "step-1")
    storage.put("step-1/.metadata", b"x")
    found = load_any_index(storage, "step-1/")
    assert isinstance(found, ForeignCheckpoint) and found.format is IndexFormat.TORCH_DCP
    assert opened == ["step-1"]
    with pytest.raises(CheckpointFormatError, match=r"is a torch DCP checkpoint.*docs/dcp.md"):
        cloudckpt.Checkpoint(v=np.zeros(2)).restore(str(tmp_path / "step-1"))
    target = np.zeros(2)
    cloudckpt.load_checkpoint(str(tmp_path / "step-1")).restore("model/w", target)  # the foreign reader's restore
    assert restored == [("model/w", target)]
    cloudckpt.Checkpoint(v=np.zeros(2)).write(str(tmp_path / "step-1"))  # an index wins over the directory
    assert not isinstance(load_any_index(storage, "step-1"), ForeignCheckpoint)
    with pytest.raises(ValueError, match="not a directory layout"):
        sniff.register_directory_reader(IndexFormat.TENSORFLOW, ".metadata", opener)
