"""Data objects spread over hashed sub-prefixes (issue 16): named, found, copied and cleaned like any other.

A save of many data objects to a store that partitions by key prefix (S3, GCS) puts them under
``<name>.d/<2 hex>/``; the index names every object's full key. ``SPREAD_MIN_OBJECTS`` is lowered
here so a small save spreads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import servers

from cloudckpt import Checkpoint, CheckpointManager
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import data_key, decode_index, encode_index, object_checkpoint, renamed_object
from cloudckpt.format.index_fetch import load_index
from cloudckpt.manager.cleanup import find_leftovers, remove_leftovers
from cloudckpt.saving import objects as saving_objects
from cloudckpt.storage import TransferConfig, join_url, open_storage, register_storage, unregister_storage


def test_spread_names_sit_in_their_own_checkpoints_directory() -> None:
    plain = data_key("ckpt-7", 3, 512, "abcdef0123456789")
    spread = data_key("ckpt-7", 3, 512, "abcdef0123456789", spread=True)
    assert spread.startswith("ckpt-7.d/") and spread.endswith("/" + plain) and len(spread.split("/")[1]) == 2
    assert object_checkpoint(spread) == object_checkpoint(plain) == "ckpt-7"
    assert object_checkpoint("ckpt-8.d/3f/" + plain) is None  # another checkpoint's directory
    assert object_checkpoint("other-run/" + plain) is None and object_checkpoint("ckpt-7.d/zz/" + plain) is None
    renamed = renamed_object(spread, "final")
    assert object_checkpoint(renamed) == "final" and renamed.startswith("final.d/")
    assert renamed_object(plain, "final") == "final" + plain[len("ckpt-7"):]


def test_an_index_naming_a_foreign_spread_directory_is_refused(tmp_path: Path) -> None:
    path = Checkpoint(w=np.arange(4.0)).write(tmp_path / "c")
    doc = json.loads((tmp_path / "c.index").read_text())
    own = doc["objects"][0]["name"]
    doc["objects"][0]["name"] = "other.d/00/" + own
    with pytest.raises(CheckpointFormatError, match="not a data object of 'c'"):
        decode_index(json.dumps(doc).encode(), "c", path)
    doc["objects"][0]["name"] = "c.d/00/" + own  # its own directory: fine
    assert decode_index(json.dumps(doc).encode(), "c", path).objects[0].name == "c.d/00/" + own
    index = decode_index(json.dumps(doc).encode(), "c", path)
    assert decode_index(encode_index(index), "c", path) == index


@pytest.fixture(params=["s3", "gcs"])
def cloud(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh directory on SeaweedFS or fake-gcs-server; a save of 2 objects or more spreads them."""
    monkeypatch.setattr(saving_objects, "SPREAD_MIN_OBJECTS", 2)
    monkeypatch.setattr(saving_objects, "TARGET_OBJECT_SIZE", 256 * 1024)  # a few objects per save
    if request.param == "s3":
        server: servers.Server = request.getfixturevalue("seaweedfs")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        yield f"s3://{request.getfixturevalue('s3_bucket')}/run-{uuid.uuid4().hex[:8]}"
    else:
        yield f"gs://{request.getfixturevalue('gcs_bucket')}/run-{uuid.uuid4().hex[:8]}"


def _state() -> dict[str, np.ndarray]:
    return {f"w{i}": np.full(40_000, float(i)) for i in range(6)}


def test_spread_checkpoints_save_restore_evict_and_clean_up(cloud: str) -> None:
    storage = open_storage(cloud, config=TransferConfig(max_concurrency=4))
    register_storage(storage)
    try:
        state = _state()
        manager = CheckpointManager(Checkpoint(s=state), cloud, max_to_keep=1, incremental=False,
                                    leftover_min_age=None)
        manager.save()
        index = load_index(storage, "ckpt-1")
        assert len(index.objects) > 1 and all(o.name.startswith("ckpt-1.d/") for o in index.objects)
        target = {k: np.zeros_like(v) for k, v in state.items()}
        Checkpoint(s=target).restore(join_url(cloud, "ckpt-1")).assert_consumed()
        assert all(np.array_equal(target[k], state[k]) for k in state)
        # A crashed save's spread objects are leftovers; the committed ones are not.
        crashed = data_key("ckpt-9", 0, 2, uuid.uuid4().hex[:16], spread=True)
        storage.put(crashed, b"x" * 100)
        found = {item.key for item in find_leftovers(storage, min_age=timedelta(0))}
        assert found == {crashed}
        remove_leftovers(storage, find_leftovers(storage, min_age=timedelta(0)))
        assert not storage.exists(crashed)
        manager.save()  # evicts ckpt-1: its spread objects go too
        assert not [m.key for m in storage.list("ckpt-1")]
        assert all(storage.exists(o.name) for o in load_index(storage, "ckpt-2").objects)
    finally:
        unregister_storage(storage)


def test_the_cli_lists_copies_and_verifies_spread_checkpoints(cloud: str, tmp_path: Path) -> None:
    storage = open_storage(cloud)
    register_storage(storage)
    try:
        CheckpointManager(Checkpoint(s=_state()), cloud, max_to_keep=2, leftover_min_age=None).save()
    finally:
        unregister_storage(storage)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cloudckpt", *args], capture_output=True, text=True,
                              timeout=120, check=False)

    listing = json.loads(cli("ls", cloud, "--json").stdout)
    assert listing["subdirectories"] == [] and [r["status"] for r in listing["checkpoints"]] == ["committed"]
    assert cli("verify", cloud).returncode == 0
    assert cli("cp", f"{cloud}/ckpt-1", str(tmp_path / "local" / "copy")).returncode == 0
    copied = load_index(open_storage(str(tmp_path / "local")), "copy")
    assert all(object_checkpoint(o.name) == "copy" for o in copied.objects)
    target = {k: np.zeros_like(v) for k, v in _state().items()}
    Checkpoint(s=target).read(tmp_path / "local" / "copy").expect_partial()
    assert all(np.array_equal(target[k], v) for k, v in _state().items())
