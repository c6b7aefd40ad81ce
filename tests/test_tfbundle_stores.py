"""TensorFlow's checkpoints on every store (local disk, SeaweedFS, fake-gcs-server) and through the CLI.

The fixtures TensorFlow 2.21 wrote (tests/tf_fixtures/data) are uploaded as they are; no
TensorFlow is needed to read them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import servers
from test_cli import assert_one_line_error, cli
from test_tfbundle import CHECKPOINTS, FIXTURES, assert_same, expected, expected_array

import cloudckpt
from cloudckpt.errors import ChecksumError
from cloudckpt.storage import open_storage
from cloudckpt.tfbundle import Bundle


def upload(directory: str) -> None:
    """Every fixture file under ``directory`` (a URL), keeping TensorFlow's names."""
    storage = open_storage(directory)
    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file() and not path.name.endswith(".expected.json"):
            storage.put(path.relative_to(FIXTURES).as_posix(), path.read_bytes())


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The fixtures uploaded to a fresh directory on each backend."""
    if request.param == "local":
        root = str(tmp_path / "tf")
    elif request.param == "s3":
        server: servers.Server = request.getfixturevalue("seaweedfs")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        root = f"s3://{request.getfixturevalue('s3_bucket')}/tf-{uuid.uuid4().hex[:8]}"
    else:
        request.getfixturevalue("fake_gcs")
        root = f"gs://{request.getfixturevalue('gcs_bucket')}/tf-{uuid.uuid4().hex[:8]}"
    upload(root)
    yield root


def test_read_every_fixture_from_every_store(store: str) -> None:
    for checkpoint in CHECKPOINTS:
        reader = cloudckpt.load_checkpoint(f"{store}/{checkpoint}")
        for key, doc in expected(checkpoint).items():
            if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
                assert_same(reader.get_tensor(key), expected_array(doc), f"{checkpoint} {key}")
    latest = cloudckpt.latest_checkpoint(f"{store}/manager")
    assert latest == f"{store}/manager/ckpt-4"
    assert cloudckpt.load_variable(latest, "weights").tolist() == [[4.0] * 3] * 2


def test_a_damaged_shard_on_a_store_names_the_tensor(store: str) -> None:
    storage = open_storage(f"{store}/sharded")
    shard = "ckpt-1.data-00000-of-00004"
    data = bytearray(storage.get(shard))
    offset = Bundle(storage, "ckpt-1", storage.get("ckpt-1.index")).entries["w0/.ATTRIBUTES/VARIABLE_VALUE"].offset
    data[offset + 100] ^= 1
    storage.put(shard, bytes(data))
    with pytest.raises(ChecksumError) as caught:
        cloudckpt.load_variable(f"{store}/sharded/ckpt-1", "w0")
    assert caught.value.key == "w0" and caught.value.url == storage.url_for(shard)
    result = cli("verify", f"{store}/sharded/ckpt-1", "--json")
    assert result.returncode == 1, result.stderr
    (report,) = json.loads(result.stdout)["checkpoints"]
    assert [(p["kind"], p["key"]) for p in report["problems"]] == [("crc-mismatch", "w0")]


def test_cli_ls_inspect_verify_export(store: str, tmp_path: Path) -> None:
    listing = cli("ls", f"{store}/manager", "--json")
    assert listing.returncode == 0, listing.stderr
    doc = json.loads(listing.stdout)
    assert doc["latest"] == "ckpt-4"
    rows = {row["name"]: row for row in doc["checkpoints"]}
    assert sorted(rows) == ["ckpt-2", "ckpt-3", "ckpt-4"]
    assert all(r["status"] == "committed" and r["format"] == "tensorflow" and r["managed"] for r in rows.values())
    assert rows["ckpt-4"]["size"] == sum((FIXTURES / "manager" / f"ckpt-4{s}").stat().st_size
                                         for s in (".index", ".data-00000-of-00001"))

    shown = cli("inspect", f"{store}/optimizer/ckpt-1", "--json")
    assert shown.returncode == 0, shown.stderr
    entries = {e["key"]: e for e in json.loads(shown.stdout)["entries"]}
    assert entries["save_counter"]["value"] == 1
    assert entries["model/layers/0/kernel"]["tensorflow_key"] == "model/layers/0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert entries["model/layers/0/kernel"]["shape"] == [3, 4]
    text = cli("inspect", f"{store}/partitioned/model.ckpt")
    assert text.returncode == 0 and "partitioned: 3 slices" in text.stdout, text.stdout

    verified = cli("verify", f"{store}/manager")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "3 checkpoint(s) verified: 3 intact, 0 damaged" in verified.stdout
    for checkpoint in ("basic/ckpt-1", "sharded/ckpt-1", "partitioned/model.ckpt", "optimizer/ckpt-1"):
        assert cli("verify", f"{store}/{checkpoint}").returncode == 0, checkpoint

    npz, st = tmp_path / "basic.npz", tmp_path / "basic.safetensors"
    assert cli("export", f"{store}/basic/ckpt-1", str(npz)).returncode == 0
    assert cli("export", f"{store}/basic/ckpt-1", str(st), "model").returncode == 0
    want = expected("basic/ckpt-1")
    with np.load(npz, allow_pickle=False) as loaded:
        assert loaded["model/layers/1/kernel"].tolist() == want["model/layers/1/kernel/.ATTRIBUTES/VARIABLE_VALUE"][
            "value"]
        assert loaded["bf16"].dtype == np.float32 and loaded["bf16"].tolist() == [1.0, -2.5, 3.140625, 65280.0]
        assert loaded["texts"].tolist() == [text.encode("latin-1") for text in
                                            want["texts/.ATTRIBUTES/VARIABLE_VALUE"]["value"]]
    header_size = int.from_bytes(st.read_bytes()[:8], "little")
    header = json.loads(st.read_bytes()[8:8 + header_size])
    assert sorted(k for k in header if k != "__metadata__") == [
        "model/config/a~1b", "model/config/x.y", "model/layers/0/bias", "model/layers/0/kernel",
        "model/layers/1/bias", "model/layers/1/kernel"]


def test_cli_cp_copies_a_tensorflow_directory_as_is(store: str, tmp_path: Path) -> None:
    target = tmp_path / "copy"
    result = cli("cp", f"{store}/manager", str(target))
    assert result.returncode == 0, result.stderr
    for name in ("ckpt-2", "ckpt-3", "ckpt-4"):
        for suffix in (".index", ".data-00000-of-00001"):
            assert (target / f"{name}{suffix}").read_bytes() == (FIXTURES / "manager" / f"{name}{suffix}").read_bytes()
    assert cloudckpt.latest_checkpoint(target) == str(target / "ckpt-4")
    assert_one_line_error(cli("cp", f"{store}/manager/ckpt-4", f"{target}/"), 5, "already exists")

    renamed = cli("cp", f"{store}/sharded/ckpt-1", f"{target}/sharded-copy")
    assert renamed.returncode == 0, renamed.stderr
    assert sorted(p.name for p in target.glob("sharded-copy*")) == [
        "sharded-copy.data-00000-of-00004", "sharded-copy.data-00001-of-00004", "sharded-copy.data-00002-of-00004",
        "sharded-copy.data-00003-of-00004", "sharded-copy.index"]
    for key, doc in expected("sharded/ckpt-1").items():
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
            assert_same(cloudckpt.load_variable(target / "sharded-copy", key), expected_array(doc), key)


def test_cli_cp_refuses_a_damaged_tensorflow_source(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for suffix in (".index", ".data-00000-of-00001"):
        (source / f"ckpt-1{suffix}").write_bytes((FIXTURES / "basic" / f"ckpt-1{suffix}").read_bytes())
    shard = source / "ckpt-1.data-00000-of-00001"
    data = bytearray(shard.read_bytes())
    data[50] ^= 0xFF  # inside f32
    shard.write_bytes(bytes(data))
    for reread in ([], ["--no-reread"]):  # the bytes are checked as they pass, re-read or not
        result = cli("cp", *reread, str(source / "ckpt-1"), str(tmp_path / "dst" / "ckpt-1"))
        assert_one_line_error(result, 1, "f32: source bytes", "the source", "is damaged, nothing was committed")
        assert not (tmp_path / "dst" / "ckpt-1.index").exists()
        assert not (tmp_path / "dst" / "ckpt-1.data-00000-of-00001").exists()


def test_gc_keeps_tensorflow_checkpoints_and_finds_their_crashed_temp_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for path in (FIXTURES / "manager").iterdir():
        if not path.name.endswith(".expected.json"):
            (run / path.name).write_bytes(path.read_bytes())
    (run / "ckpt-5.data-00000-of-00001.tempstate8127").write_bytes(b"half a save")  # a TF save that died
    (run / "ckpt-4.data-00000-of-00001.tempstate99").write_bytes(b"an older attempt")
    result = cli("gc", str(run), "--min-age", "0s", "--json", "--yes")
    assert result.returncode == 0 and "unreadable" not in result.stderr, result.stderr
    removed = sorted(item["key"] for item in json.loads(result.stdout)["leftovers"])
    assert removed == ["ckpt-4.data-00000-of-00001.tempstate99", "ckpt-5.data-00000-of-00001.tempstate8127"]
    assert cloudckpt.latest_checkpoint(run) == str(run / "ckpt-4")
    for name in ("ckpt-2", "ckpt-3", "ckpt-4"):
        assert (run / f"{name}.index").exists() and (run / f"{name}.data-00000-of-00001").exists()
