"""torch DCP's own layout in and out: read, converted with ``cp``, exported with ``export --format torch-dcp``.

One spawn of 2 gloo processes saves a model (``Shard(0)`` DTensor weights) + Adam state +
byte items with torch's own ``FileSystemWriter``, so every tensor is stored in 2 chunks; the
tests read that directory from local disk and from SeaweedFS (the same files uploaded: the
layout ``FsspecWriter`` writes), convert it, load the copy with DCP, and compare SHA-256s of
every tensor with what the ranks saved.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import dcp_worker
import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

import cloudckpt
from cloudckpt.adapters.torch import numpy_to_tensor
from cloudckpt.dcp import StorageReader, StorageWriter, layout_metadata
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format.index_fetch import load_index
from cloudckpt.storage import open_storage
from cloudckpt.testing.processes import spawn_reports
from cloudckpt.tools import copy, inspect_checkpoint, list_checkpoints, verify
from cloudckpt.tools.export_torch_dcp import export_torch_dcp

SPAWN_TIMEOUT = 120


def save_with_torch(rank: int, world: int, port: int, directory: str, report: dict[str, Any]) -> None:
    """Spawned 2x: DCP's FileSystemWriter saves a sharded model + optimizer + byte items."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    model, optimizer = dcp_worker.model_and_optimizer(mesh)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "step": 5,
             "extra": {"note": "hi", "bf": torch.arange(6, dtype=torch.bfloat16) * 0.3}}
    dcp_save(state, storage_writer=FileSystemWriter(directory))
    report["digests"] = dcp_worker.full_digests(state)
    report["byte_items"] = dcp_worker.byte_item_fqns(state)
    dist.barrier()
    dist.destroy_process_group()


def fresh_state() -> dict[str, Any]:
    """The same structure, other values: what a restart builds before it loads."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "step": 0,
            "extra": {"note": "", "bf": torch.zeros(6, dtype=torch.bfloat16)}}


def sha(value: Any) -> str:
    return dcp_worker.digest(value if isinstance(value, torch.Tensor) else numpy_to_tensor(np.asarray(value)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("dcp") / "step-5"
    reports = spawn_reports(save_with_torch, 2, str(directory), timeout=SPAWN_TIMEOUT)
    assert reports[0]["digests"] == reports[1]["digests"]
    return directory, reports[0]


@pytest.fixture(scope="module")
def on_s3(saved: tuple[Path, dict[str, Any]], s3_root: str) -> str:
    """The same directory on SeaweedFS: the files FsspecWriter writes to S3, byte for byte."""
    directory, _ = saved
    storage = open_storage(s3_root)
    for file in directory.iterdir():
        storage.put(f"torch/step-5/{file.name}", file.read_bytes())
    return f"{s3_root}/torch/step-5"


def assert_loaded(state: dict[str, Any], report: dict[str, Any]) -> None:
    assert dcp_worker.full_digests(state) == report["digests"]
    assert state["step"] == 5 and state["extra"]["note"] == "hi"


# ---------------------------------------------------------------------------- read
def test_load_variable_assembles_every_chunked_tensor_bit_exact(saved: tuple[Path, dict[str, Any]],
                                                                on_s3: str) -> None:
    directory, report = saved
    for url in (str(directory), on_s3):
        reader = cloudckpt.load_checkpoint(url)
        shapes = reader.get_variable_to_shape_map()
        assert set(shapes) == set(report["digests"])
        for fqn, digest in report["digests"].items():
            assert sha(cloudckpt.load_variable(url, fqn)) == digest, (url, fqn)
        assert reader.get_tensor("step") == 5 and reader.get_tensor("extra.note") == "hi"
        assert str(reader.get_variable_to_dtype_map()["extra.bf"]) == "bfloat16"
    weight = load_index_free_metadata(directory).state_dict_metadata["model.0.weight"]
    assert len(weight.chunks) == 2  # really resharded: 2 ranks wrote one chunk each


def load_index_free_metadata(directory: Path) -> Any:
    return layout_metadata.read_dcp_metadata(open_storage(str(directory.parent)), directory.name)


def test_tools_list_inspect_and_verify_it(saved: tuple[Path, dict[str, Any]], on_s3: str) -> None:
    directory, report = saved
    rows = {r.name: r for r in list_checkpoints(str(directory.parent)).checkpoints}
    assert rows["step-5"].format == "torch-dcp" and rows["step-5"].status == "committed"
    assert rows["step-5"].size == sum(f.stat().st_size for f in directory.iterdir())
    info = inspect_checkpoint(on_s3)
    doc = info.to_json()
    assert doc["format"] == "torch-dcp"
    assert {e["key"] for e in doc["entries"]} == set(report["digests"])
    assert next(e for e in doc["entries"] if e["key"] == "model.0.weight")["shape"] == [8, 4]
    assert verify(on_s3).intact


def test_verify_names_a_truncated_chunk_and_a_missing_file(saved: tuple[Path, dict[str, Any]],
                                                           tmp_path: Path) -> None:
    directory, _ = saved
    broken = tmp_path / "step-5"
    shutil.copytree(directory, broken)
    biggest = max((f for f in broken.iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:-200])
    verdict = verify(str(broken)).checkpoints[0]
    assert not verdict.intact
    assert all(f.kind == "unreadable" for f in verdict.findings) and verdict.findings[0].key
    biggest.unlink()
    kinds = {f.kind for f in verify(str(broken)).checkpoints[0].findings}
    assert "missing-object" in kinds


# ---------------------------------------------------------------------------- convert, export
def test_cp_converts_and_cloudckpt_dcp_loads_the_copy_bit_exact(saved: tuple[Path, dict[str, Any]],
                                                                on_s3: str, s3_root: str, tmp_path: Path) -> None:
    directory, report = saved
    for src, dst in ((str(directory), str(tmp_path / "conv" / "ckpt-5")), (on_s3, f"{s3_root}/conv/ckpt-5")):
        copied = copy(src, dst).copied[0]
        assert copied.verified and copied.objects >= 1
        state = fresh_state()
        dcp_load(state, storage_reader=StorageReader(dst))
        assert_loaded(state, report)
        assert verify(dst).intact  # CRC32C on every byte now
    index = load_index(open_storage(str(tmp_path / "conv")), "ckpt-5")
    assert index.dcp is not None and len(index.entries["model.0.weight"].chunks) == 2  # type: ignore[union-attr]
    with pytest.raises(cloudckpt.errors.AlreadyExistsError):
        copy(str(directory), str(tmp_path / "conv" / "ckpt-5"))


def test_export_torch_dcp_is_read_by_torchs_file_system_reader_bit_exact(
        saved: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    directory, report = saved
    copy(str(directory), str(tmp_path / "ckpt-5"))
    out = tmp_path / "exported"
    export_torch_dcp(str(tmp_path / "ckpt-5"), out)
    state = fresh_state()
    dcp_load(state, storage_reader=FileSystemReader(str(out)))
    assert_loaded(state, report)
    dcp_to_torch_save(str(out), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert dcp_worker.full_digests(full) == report["digests"]  # nested again as the state dict was
    assert isinstance(full["optim"]["param_groups"], list)
    with pytest.raises(FileExistsError):
        export_torch_dcp(str(tmp_path / "ckpt-5"), out)


def test_a_checkpoint_written_through_cloudckpt_exports_bf16_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(3)
    w, i = torch.randn(5, 7).to(torch.bfloat16), torch.arange(4)
    state: dict[str, Any] = {"w": w, "i": i, "lr": 0.25}
    dcp_save(state, storage_writer=StorageWriter(str(tmp_path / "ckpt-1")))
    report = export_torch_dcp(str(tmp_path / "ckpt-1"), tmp_path / "out")
    assert report.format == "torch-dcp" and report.arrays == 2
    w2, i2 = torch.zeros(5, 7, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int64)
    loaded: dict[str, Any] = {"w": w2, "i": i2, "lr": 0.0}
    dcp_load(loaded, storage_reader=FileSystemReader(str(tmp_path / "out")))
    assert torch.equal(w2.view(torch.int16), w.view(torch.int16))
    assert torch.equal(i2, i) and loaded["lr"] == 0.25


# ---------------------------------------------------------------------------- the pickle
class _Boom:
    """Unpickled by plain pickle.load (what torch's FileSystemReader does), it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["code", "traversal", "too-large", "not-metadata"])
def test_hostile_metadata_is_refused_without_running_it(saved: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    directory, _ = saved
    target = tmp_path / "step-5"
    shutil.copytree(directory, target)
    marker = tmp_path / "ran"
    metadata = target / ".metadata"
    if case == "code":
        metadata.write_bytes(pickle.dumps(_Boom(marker)))
        expected = "system, which torch DCP's metadata does not use"
    elif case == "traversal":
        md = pickle.loads(metadata.read_bytes())
        info = next(iter(md.storage_data.values()))
        info.relative_path = "../../etc/passwd"
        metadata.write_bytes(pickle.dumps(md))
        expected = "not a file of the checkpoint directory"
    elif case == "too-large":
        monkeypatch.setattr(layout_metadata, "MAX_METADATA_BYTES", 100)
        expected = "over the 100-byte limit"
    else:
        metadata.write_bytes(pickle.dumps({"a": 1}))
        expected = "not torch DCP's Metadata"
    with pytest.raises(CheckpointFormatError, match=expected):
        cloudckpt.load_variable(str(target), "step")
    assert not marker.exists()


def test_import_cloudckpt_still_does_not_import_torch_and_reading_needs_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, os, cloudckpt; assert 'torch' not in sys.modules\n"
            "sys.modules['torch'] = None\n"
            "from cloudckpt.tools import list_checkpoints\n"
            "try:\n    cloudckpt.load_variable(sys.argv[1], 'x')\n"
            "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
            "row = list_checkpoints(os.path.dirname(sys.argv[1])).checkpoints[0]\n"
            "print('ROW', row.name, row.status, 'cloudckpt[torch]' in (row.problem or ''))\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".metadata").write_bytes(b"x")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.startswith("MissingDependencyError"), out.stdout + out.stderr
    assert "cloudckpt[torch]" in out.stdout
    assert "ROW d unreadable True" in out.stdout, out.stdout + out.stderr  # ls lists it, saying what is missing


def test_the_json_of_inspect_is_strict_json(saved: tuple[Path, dict[str, Any]]) -> None:
    directory, _ = saved
    doc = inspect_checkpoint(str(directory)).to_json()
    names = {o["name"] for o in json.loads(json.dumps(doc, allow_nan=False))["objects"]}
    assert names == {f"{directory.name}/{f.name}" for f in directory.iterdir()}


def doc_block(marker: str) -> str:
    """The ```python block of docs/dcp.md that contains ``marker``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "dcp.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    return next(b for b in blocks if marker in b)


def test_the_docs_migration_recipe_runs_as_written(on_s3: str, s3_root: str,
                                                   saved: tuple[Path, dict[str, Any]]) -> None:
    code = doc_block("run-cloudckpt")
    code = code.replace("s3://bucket/run/step-100", on_s3).replace("s3://bucket/run-cloudckpt", f"{s3_root}/doc")
    namespace: dict[str, Any] = {"state_dict": fresh_state()}
    exec(compile(code, "docs/dcp.md", "exec"), namespace)
    assert_loaded(namespace["state_dict"], saved[1])


def test_any_reader_without_its_own_conversion_goes_through_the_generic_path(
        saved: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tools' generic path (what an Orbax reader gets): cp through get_tensor alone, export .npz."""
    from cloudckpt.dcp.layout import DCPLayoutReader
    from cloudckpt.tools import export

    directory, report = saved
    monkeypatch.delattr(DCPLayoutReader, "conversion")
    copy(str(directory), str(tmp_path / "ckpt-1"))
    reader = cloudckpt.load_checkpoint(str(tmp_path / "ckpt-1"))
    assert set(reader.get_variable_to_shape_map()) == set(report["digests"])  # tensors only; names kept
    for fqn, digest in report["digests"].items():
        assert sha(reader.get_tensor(fqn)) == digest, fqn
    assert verify(str(tmp_path / "ckpt-1")).intact
    written = export(str(directory), tmp_path / "out.npz", ["model."])
    with np.load(tmp_path / "out.npz") as npz:
        assert sorted(npz.files) == sorted(k for k in report["digests"] if k.startswith("model."))
        assert sha(npz["model.0.weight"]) == report["digests"]["model.0.weight"]
    assert written.format == "torch-dcp" and written.arrays == len(npz.files)


def test_the_layout_on_gcs_reads_and_converts(saved: tuple[Path, dict[str, Any]], gcs_bucket: str) -> None:
    """FsspecWriter's layout on GCS (the files uploaded to fake-gcs-server): read and cp'd like on S3."""
    directory, report = saved
    root = f"gs://{gcs_bucket}/run-{uuid.uuid4().hex[:8]}"
    storage = open_storage(root)
    for file in directory.iterdir():
        storage.put(f"step-5/{file.name}", file.read_bytes())
    for fqn in ("model.0.weight", "optim.state.0.weight.exp_avg", "extra.bf"):
        assert sha(cloudckpt.load_variable(f"{root}/step-5", fqn)) == report["digests"][fqn]
    copy(f"{root}/step-5", f"{root}/conv/ckpt-5")
    state = fresh_state()
    dcp_load(state, storage_reader=StorageReader(f"{root}/conv/ckpt-5"))
    assert_loaded(state, report)
