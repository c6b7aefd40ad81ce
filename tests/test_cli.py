"""The ``cloudckpt`` command line, end to end: real subprocesses against local disk, SeaweedFS and fake-gcs-server.

Checkpoints are made with the library in this process; every command runs as
``python -m cloudckpt ...`` in a child that gets the same environment (``AWS_ENDPOINT_URL``,
``STORAGE_EMULATOR_HOST``, the dummy credentials conftest sets), exactly as an operator's
shell would. Assertions look at exit codes, ``--json`` output and what is left in the store.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import ml_dtypes
import numpy as np
import pytest
import servers
from botocore.config import Config

from cloudckpt import Checkpoint, CheckpointManager, Variable, latest_checkpoint, load_checkpoint
from cloudckpt.format import ArrayEntry, CheckpointIndex, Chunk, DataObject, NodeEntry, encode_index, index_key
from cloudckpt.format.index_fetch import load_index
from cloudckpt.format.state_file import parse
from cloudckpt.storage import open_storage, resolve
from cloudckpt.storage.base import TEMP_PREFIX
from cloudckpt.storage.checksum import crc32c_of

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cloudckpt ARGS`` as an operator would (stdout is not a terminal: no progress bar)."""
    return subprocess.run([sys.executable, "-m", "cloudckpt", *args], capture_output=True, text=True,
                          env=env if env is not None else dict(os.environ), cwd=REPO, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cloudckpt: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def arrays(seed: int, big: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n = 3_200_000 if big else 1000  # big: a ~12 MiB data object, several 5 MiB parts
    return {"w": rng.standard_normal(n).astype(np.float32),
            "half": rng.standard_normal((8, 5)).astype(ml_dtypes.bfloat16),
            "ids": np.arange(seed, seed + 7, dtype=np.int64)}


def save_run(directory: str, saves: int, *, big: bool = False, max_to_keep: int = 3) -> dict[str, dict[str, Any]]:
    """A managed directory with ``saves`` checkpoints; returns each checkpoint name's arrays."""
    state = arrays(0, big)
    ckpt = Checkpoint(model=state, step=Variable(0), config={"lr": 0.5, "name": "demo"})
    manager = CheckpointManager(ckpt, directory, max_to_keep=max_to_keep)
    saved = {}
    for i in range(1, saves + 1):
        for key, value in arrays(i, big).items():
            state[key][...] = value
        ckpt.step.assign(i * 10)
        path = manager.save(metadata={"step": i * 10})
        saved[path.rstrip("/").rsplit("/", 1)[-1]] = {k: v.copy() for k, v in state.items()}
    manager.close()
    return saved


def assert_restores(path: str, expected: dict[str, Any]) -> None:
    reader = load_checkpoint(path)
    for key, value in expected.items():
        got = reader.get_tensor(f"model/{key}")
        assert got.dtype == value.dtype and np.array_equal(got.view(np.uint8), value.view(np.uint8)), key


def data_object(directory: str, name: str) -> str:
    storage = resolve(f"{directory}/{name}").storage
    (obj,) = load_index(storage, name).objects
    return obj.name


# ---------------------------------------------------------------------------- local disk
def test_local_ls_inspect_export_verify(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    saved = save_run(run, 3, max_to_keep=2)  # ckpt-1 evicted
    storage = open_storage(run)
    storage.put("ckpt-4.data-00000-of-00001.0123456789abcdef", b"a crashed save")  # no index: incomplete

    listing = cli("ls", run, "--json")
    assert listing.returncode == 0, listing.stderr
    doc = json.loads(listing.stdout)
    rows = {row["name"]: row for row in doc["checkpoints"]}
    assert doc["latest"] == "ckpt-3" and rows["ckpt-3"]["latest"] and not rows["ckpt-2"]["latest"]
    assert {n: r["status"] for n, r in rows.items()} == {"ckpt-2": "committed", "ckpt-3": "committed",
                                                         "ckpt-4": "incomplete"}
    assert rows["ckpt-2"]["metadata"] == {"step": 20} and rows["ckpt-2"]["managed"]
    assert rows["ckpt-3"]["objects"] == 2 and rows["ckpt-3"]["size"] > 4000
    assert rows["ckpt-4"]["size"] == len(b"a crashed save")

    text = cli("ls", run)
    assert text.returncode == 0 and "latest" in text.stdout and "incomplete" in text.stdout

    inspected = cli("inspect", f"{run}/ckpt-3", "--json")
    assert inspected.returncode == 0, inspected.stderr
    entries = {e["key"]: e for e in json.loads(inspected.stdout)["entries"]}
    assert entries["model/w"]["dtype"] == "float32" and entries["model/w"]["shape"] == [1000]
    assert entries["model/half"]["dtype"] == "bfloat16" and entries["model/half"]["size"] == 80
    assert entries["step"]["value"] == 30 and entries["save_counter"]["value"] == 3
    assert entries["config/name"] == {"key": "config/name", "kind": "value", "type": "str", "value": "demo"}

    out_npz, out_st = tmp_path / "out.npz", tmp_path / "out.safetensors"
    assert cli("export", f"{run}/ckpt-3", str(out_npz)).returncode == 0
    assert cli("export", f"{run}/ckpt-3", str(out_st), "model").returncode == 0
    with np.load(out_npz) as npz:
        assert np.array_equal(npz["model/w"], saved["ckpt-3"]["w"])
        assert npz["model/half"].dtype == np.float32  # widened: numpy cannot name bfloat16
        assert np.array_equal(npz["model/half"], saved["ckpt-3"]["half"].astype(np.float32))
        assert int(npz["step"]) == 30 and str(npz["config/name"]) == "demo"
    raw = out_st.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    body = raw[8 + header_len:]
    for key, dtype in (("model/half", "BF16"), ("model/w", "F32"), ("model/ids", "I64")):
        start, end = header[key]["data_offsets"]
        assert header[key]["dtype"] == dtype
        assert body[start:end] == saved["ckpt-3"][key.split("/")[1]].tobytes(), key
    assert "step" not in header  # only keys under "model" were asked for

    intact = cli("verify", run)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "2 intact, 0 damaged" in intact.stdout

    # Damage: one flipped byte in ckpt-2's data, ckpt-3's data object truncated.
    flipped = tmp_path / "run" / data_object(run, "ckpt-2")
    content = bytearray(flipped.read_bytes())
    content[100] ^= 0x01
    flipped.write_bytes(bytes(content))
    truncated = tmp_path / "run" / data_object(run, "ckpt-3")
    os.truncate(truncated, truncated.stat().st_size // 2)

    damaged = cli("verify", run)
    assert damaged.returncode == 1
    assert "model/w: CRC32C mismatch" in damaged.stdout and "0 intact, 2 damaged" in damaged.stdout
    assert "is truncated" in damaged.stdout

    report = cli("verify", run, "--latest", "--json")
    assert report.returncode == 1
    (ckpt3,) = json.loads(report.stdout)["checkpoints"]
    assert ckpt3["name"] == "ckpt-3"
    kinds = {p["kind"] for p in ckpt3["problems"]}
    assert {"size-mismatch", "unreadable"} <= kinds

    assert_one_line_error(cli("export", f"{run}/ckpt-2", str(tmp_path / "bad.npz")), 1, "checksum mismatch", "model/w")
    assert not (tmp_path / "bad.npz").exists()


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    save_run(run, 1)
    assert_one_line_error(cli("inspect", f"{run}/ckpt-9"), 3, "no checkpoint at")
    assert_one_line_error(cli("inspect", f"{run}/ckpt"), 3, "did you mean")
    assert_one_line_error(cli("ls", str(tmp_path)), 3, "no checkpoints under", "run/")
    assert_one_line_error(cli("ls", "nosuchproto://bucket/run"), 2, "nosuchproto")
    assert_one_line_error(cli("cp", run, run), 5, "already has")
    assert_one_line_error(cli("export", f"{run}/ckpt-1", str(tmp_path / "x.txt")), 2, ".npz or .safetensors")

    no_credentials = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_credentials.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
                          AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL="http://127.0.0.1:9")
    assert_one_line_error(cli("ls", "s3://some-bucket/run", env=no_credentials), 4, "credentials")

    helped = cli("verify", "--help")
    assert helped.returncode == 0 and "examples:" in helped.stdout and "exit codes:" in helped.stdout


# ---------------------------------------------------------------------------- clouds
@pytest.fixture
def s3_env(seaweedfs: servers.Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """``AWS_ENDPOINT_URL`` for this process and the CLI children it starts."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    return seaweedfs.endpoint


def test_cp_between_s3_gcs_and_local(s3_env: str, s3_bucket: str, fake_gcs: servers.Server,
                                     gcs_bucket: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    s3_run, gs_run, local = f"s3://{s3_bucket}/cp-{tag}", f"gs://{gcs_bucket}/cp-{tag}", tmp_path / "laptop"
    saved = save_run(s3_run, 2, big=True)

    # The whole managed directory S3 -> GCS, data streamed in 5 MiB parts (composite upload on GCS).
    copied = cli("cp", s3_run, gs_run, "--part-size", "5MiB")
    assert copied.returncode == 0, copied.stderr
    assert copied.stdout.count("re-read and verified") == 2 and "checkpoint" in copied.stdout
    listing = json.loads(cli("ls", gs_run, "--json").stdout)
    assert listing["latest"] == "ckpt-2" and listing["state_file"]
    assert [r["name"] for r in listing["checkpoints"] if r["status"] == "committed"] == ["ckpt-1", "ckpt-2"]

    # One checkpoint GCS -> local directory (trailing '/'), and GCS -> S3 under a new name.
    down = cli("cp", f"{gs_run}/ckpt-2", f"{local}/", "--part-size", "5MiB")
    assert down.returncode == 0, down.stderr
    back = cli("cp", f"{gs_run}/ckpt-1", f"{s3_run}-back/restored-1", "--part-size", "5MiB")
    assert back.returncode == 0, back.stderr
    assert_restores(f"{local}/ckpt-2", saved["ckpt-2"])
    assert_restores(f"{s3_run}-back/restored-1", saved["ckpt-1"])
    assert_restores(f"{gs_run}/ckpt-1", saved["ckpt-1"])

    verified = cli("verify", gs_run)
    assert verified.returncode == 0 and "2 intact" in verified.stdout, verified.stdout + verified.stderr

    assert_one_line_error(cli("cp", f"{gs_run}/ckpt-2", f"{local}/"), 5, "already exists", "--force")
    assert_one_line_error(cli("ls", f"s3://no-such-bucket-{tag}/run"), 3, "no-such-bucket")


CRASHING_SAVE = """
import sys
import numpy as np
from cloudckpt import Checkpoint, CheckpointManager
ckpt = Checkpoint(model={"w": np.ones(50_000, np.float32)})
CheckpointManager(ckpt, sys.argv[1], max_to_keep=3).save(checkpoint_number=2)
raise SystemExit("the crash point did not fire")
"""


def _s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def test_gc_removes_a_crashed_saves_leftovers_on_s3(s3_env: str, s3_bucket: str) -> None:
    run = f"s3://{s3_bucket}/gc-{uuid.uuid4().hex[:8]}"
    saved = save_run(run, 1)
    prefix = run.split("/", 3)[3]
    client = _s3_client(s3_env)
    stale_key = "ckpt-3.data-00000-of-00001.00ff00ff00ff00ff"
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key=f"{prefix}/{stale_key}")
    crashed = subprocess.run([sys.executable, "-c", CRASHING_SAVE, run], capture_output=True, text=True,
                             env={**os.environ, "CLOUDCKPT_CRASH_AT": "after_data_upload"}, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    storage = open_storage(run)
    assert not storage.exists(index_key("ckpt-2"))
    leftover_data = [m.key for m in storage.list("ckpt-2.data-")]
    assert leftover_data

    young = cli("gc", run)  # default --min-age 1d: everything is too young to be touched
    assert young.returncode == 0 and "nothing to clean" in young.stdout, young.stderr
    dry = cli("gc", run, "--min-age", "0s", "--json")
    assert dry.returncode == 0, dry.stderr
    found = {(item["kind"], item["key"]) for item in json.loads(dry.stdout)["leftovers"]}
    assert {("unreferenced-data", key) for key in leftover_data} <= found
    assert ("multipart-upload", stale_key) in found
    assert not any(key.startswith("ckpt-1") for _, key in found)
    assert [m.key for m in storage.list("ckpt-2.data-")] == leftover_data  # a dry run deletes nothing

    removed = cli("gc", run, "--min-age", "0s", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "removed" in removed.stdout
    assert storage.list("ckpt-2.data-") == []
    pending = client.list_multipart_uploads(Bucket=s3_bucket, Prefix=prefix).get("Uploads", [])
    assert upload["UploadId"] not in {u["UploadId"] for u in pending}
    assert_restores(f"{run}/ckpt-1", saved["ckpt-1"])  # the committed checkpoint is untouched


def test_gc_and_verify_on_gcs(fake_gcs: servers.Server, gcs_bucket: str) -> None:
    run = f"gs://{gcs_bucket}/gc-{uuid.uuid4().hex[:8]}"
    saved = save_run(run, 2)
    storage = open_storage(run)
    storage.put("ckpt-3.data-00000-of-00002.abcdefabcdefabcd", b"x" * 1000)
    storage.put(f"{TEMP_PREFIX}deadbeef/part-000000.cloudckpt-tmp", b"y" * 100)

    removed = cli("gc", run, "--min-age", "0s", "--yes", "--json")
    assert removed.returncode == 0, removed.stderr
    doc = json.loads(removed.stdout)
    assert {item["kind"] for item in doc["leftovers"]} == {"unreferenced-data", "temporary"}
    assert doc["removed"] == 2 and doc["bytes_freed"] == 1100
    assert not storage.exists("ckpt-3.data-00000-of-00002.abcdefabcdefabcd")
    assert storage.list(TEMP_PREFIX) == []
    for name, expected in saved.items():
        assert_restores(f"{run}/{name}", expected)

    # A flipped byte written back to the store is caught by verify, by key.
    key = data_object(run, "ckpt-2")
    content = bytearray(storage.get(key))
    content[10] ^= 0x80
    storage.put(key, bytes(content))
    damaged = cli("verify", f"{run}/ckpt-2")
    assert damaged.returncode == 1
    assert "model/w: CRC32C mismatch" in damaged.stdout, damaged.stdout


def test_sharded_array_layout_verify_and_export(tmp_path: Path) -> None:
    """An array stored as two column blocks (as a multi-host save writes it), built by hand."""
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    left, right = np.ascontiguousarray(full[:, :3]).tobytes(), np.ascontiguousarray(full[:, 3:]).tobytes()
    obj = "sharded-1.data-00000-of-00001.5ca1ab1e5ca1ab1e"
    chunks = (Chunk(0, 0, len(left), crc32c_of([left]), (0, 0), (4, 3)),
              Chunk(0, len(left), len(right), crc32c_of([right]), (0, 3), (4, 3)))
    index = CheckpointIndex("sharded-1", {"": NodeEntry("object", ("x",)),
                                          "x": ArrayEntry("float32", (4, 6), "ndarray", chunks)},
                            (DataObject(obj, len(left) + len(right)),))
    storage = open_storage(str(tmp_path))
    storage.put(obj, left + right)
    storage.put(index_key("sharded-1"), encode_index(index))

    shown = cli("inspect", str(tmp_path / "sharded-1"), "--chunks")
    assert shown.returncode == 0, shown.stderr
    assert "sharded: 2 chunks" in shown.stdout and "at [0, 3]" in shown.stdout
    entry = json.loads(cli("inspect", str(tmp_path / "sharded-1"), "--json").stdout)["entries"][0]
    assert entry["shape"] == [4, 6] and [c["start"] for c in entry["chunks"]] == [[0, 0], [0, 3]]

    assert cli("verify", str(tmp_path / "sharded-1")).returncode == 0
    assert cli("export", str(tmp_path / "sharded-1"), str(tmp_path / "x.npz")).returncode == 0
    with np.load(tmp_path / "x.npz") as npz:
        assert np.array_equal(npz["x"], full)


def test_verify_checks_block_checksums_too(tmp_path: Path) -> None:
    """A large chunk's per-block CRC32Cs are index entries too: wrong ones fail verify even when the bytes are fine."""
    import base64
    import json

    from cloudckpt import Checkpoint

    Checkpoint(big=np.arange(600_000, dtype=np.float32)).write(str(tmp_path / "ck"))  # 2.3 MiB: 3 blocks
    assert cli("verify", str(tmp_path / "ck")).returncode == 0
    doc = json.loads((tmp_path / "ck.index").read_text())
    blocks = doc["entries"]["big"]["chunks"][0]["blocks"]
    packed = bytearray(base64.b64decode(blocks["crc32c"]))
    packed[5] ^= 0x01  # the second block's checksum
    blocks["crc32c"] = base64.b64encode(bytes(packed)).decode()
    (tmp_path / "ck.index").write_text(json.dumps(doc))
    result = cli("verify", str(tmp_path / "ck"))
    assert result.returncode == 1 and "block CRC32C(s) [1]" in result.stdout + result.stderr


# ---------------------------------------------------------------------------- export keys, cp of damaged directories
def torch_like_checkpoint(path: Path) -> str:
    """Dotted PyTorch names under ``model/``, plus the inline scalars an optimizer's state has."""
    state = {"head.weight": np.ones((2, 3), np.float32), "head.bias": np.zeros(2, np.float32),
             "header.weight": np.full(4, 7, np.float32), "layers.1.w": np.ones(1), "layers.10.w": np.zeros(1)}
    groups = [{"lr": 0.1 * i, "betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False} for i in range(8)]
    return Checkpoint(model=state, optimizer={"param_groups": groups}, step=Variable(5)).write(str(path))


def test_export_keys_select_dotted_names_and_refuse_misspellings(tmp_path: Path) -> None:
    ckpt = torch_like_checkpoint(tmp_path / "c")
    out = tmp_path / "head.npz"
    picked = cli("export", ckpt, str(out), "model/head", "model/layers.1")
    assert picked.returncode == 0, picked.stderr
    with np.load(out) as npz:
        assert sorted(npz.files) == ["model/head.bias", "model/head.weight", "model/layers.1.w"]

    missing = cli("export", ckpt, str(tmp_path / "x.npz"), "model/head", "model/haed")
    assert_one_line_error(missing, 3, "'model/haed'", "no array or value matches")
    assert not (tmp_path / "x.npz").exists() and not list(tmp_path.glob(".x.npz.*"))
    assert_one_line_error(cli("export", ckpt, str(tmp_path / "x.npz"), "model/hea"), 3, "did you mean 'model/head")
    assert cli("export", ckpt, str(tmp_path / "p.npz"), "model/hea").returncode == 3

    prefixed = cli("export", ckpt, str(tmp_path / "all-heads.npz"), "model/head")
    assert prefixed.returncode == 0
    with np.load(tmp_path / "all-heads.npz") as npz:
        assert "model/header.weight" not in npz.files  # not a separator after "head"
    raw = cli("export", ckpt, str(tmp_path / "raw.npz"), "model/layers.")
    assert raw.returncode == 0
    with np.load(tmp_path / "raw.npz") as npz:
        assert sorted(npz.files) == ["model/layers.1.w", "model/layers.10.w"]


def test_export_to_safetensors_summarizes_what_it_skips_in_one_line(tmp_path: Path) -> None:
    ckpt = torch_like_checkpoint(tmp_path / "c")
    result = cli("export", ckpt, str(tmp_path / "c.safetensors"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert "the .safetensors format cannot hold them: 40 inline values (" in warnings[0]
    assert "and 37 more" in warnings[0]


def test_export_into_a_missing_directory_names_the_target(tmp_path: Path) -> None:
    ckpt = torch_like_checkpoint(tmp_path / "c")
    target = tmp_path / "no" / "such" / "dir" / "out.npz"
    result = cli("export", ckpt, str(target))
    assert_one_line_error(result, 3, str(target), "does not exist")
    assert ".tmp" not in result.stderr


def test_cp_of_a_directory_copies_every_intact_checkpoint(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    saved = save_run(src, 4, max_to_keep=5)
    flipped = tmp_path / "src" / data_object(src, "ckpt-2")
    content = bytearray(flipped.read_bytes())
    content[100] ^= 0x01
    flipped.write_bytes(bytes(content))
    (tmp_path / "src" / "ckpt-4.index").write_text("{not json")  # the latest: damaged too

    result = cli("cp", src, dst)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cloudckpt: error:")]
    assert len(errors) == 2 and "ckpt-2" in errors[0] and "CRC32C" in errors[0] and "ckpt-4" in errors[1]
    assert "copied 2 of 4 checkpoints; not copied (damaged): ckpt-2, ckpt-4" in result.stdout
    for name in ("ckpt-1", "ckpt-3"):
        assert_restores(f"{dst}/{name}", saved[name])
    assert not (tmp_path / "dst" / "ckpt-2.index").exists() and not (tmp_path / "dst" / "ckpt-4.index").exists()
    assert latest_checkpoint(dst) == f"{dst}/ckpt-3"
    state = parse((tmp_path / "dst" / "checkpoint").read_text(), "x")
    assert state.model_checkpoint_path == "ckpt-3" and state.all_model_checkpoint_paths == ["ckpt-1", "ckpt-3"]
    assert len(state.all_model_checkpoint_timestamps) == 2 and state.writer is None
