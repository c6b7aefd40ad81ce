"""A directory (or bucket) wiped between two saves: the refusal says what happened and what to do.

The next save used to fail with "another writer took over", which sends the user hunting
for a second job that does not exist. The state file and checkpoints are gone: say that,
and that a new ``CheckpointManager`` starts over.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest
import servers
from botocore.config import Config
from conftest import storage_of, unique_name

from cloudckpt import Checkpoint, CheckpointManager
from cloudckpt.errors import ConcurrentWriterError
from cloudckpt.format.state_file import STATE_KEY
from cloudckpt.storage import join_url


def two_saves(root: str) -> tuple[CheckpointManager, np.ndarray]:
    w = np.arange(16.0)
    manager = CheckpointManager(Checkpoint(w=w), root, max_to_keep=3)
    manager.save()
    manager.save()
    return manager, w


def test_a_wiped_directory_is_named_as_such(root: str) -> None:
    manager, w = two_saves(root)
    storage = storage_of(root)
    storage.delete([meta.key for meta in storage.list()])
    for _ in range(2):  # refused with the same words at every later save
        with pytest.raises(ConcurrentWriterError) as info:
            manager.save()
        message = str(info.value)
        assert "another writer took over" not in message
        assert f"state file {storage.url_for(STATE_KEY)} was deleted" in message
        assert "2 checkpoints it manages are gone too (ckpt-1, ckpt-2)" in message
        assert "create a new CheckpointManager" in message
    assert list(storage.list()) == []  # the refusal wrote nothing
    fresh = CheckpointManager(Checkpoint(w=w), root, max_to_keep=3)  # what the message says to do
    assert fresh.save() == join_url(root, "ckpt-1")


def test_a_deleted_state_file_alone_is_named_as_such(tmp_path: Path) -> None:
    manager, _ = two_saves(str(tmp_path))
    (tmp_path / STATE_KEY).unlink()
    with pytest.raises(ConcurrentWriterError, match=r"was deleted since this manager's last save; its checkpoints "
                                                    r"are still there") as info:
        manager.save()
    assert "another writer" not in str(info.value)


def test_a_removed_directory_is_named_as_such(tmp_path: Path) -> None:
    run = tmp_path / "run"
    manager, _ = two_saves(str(run))
    shutil.rmtree(run)
    with pytest.raises(ConcurrentWriterError, match=r"2 checkpoints it manages are gone too") as info:
        manager.save()
    assert "create a new CheckpointManager" in str(info.value)
    assert not run.exists()


def test_a_deleted_bucket_is_named_as_such(seaweedfs: servers.Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    bucket = unique_name("wiped")
    servers.create_bucket(seaweedfs.endpoint, bucket)
    manager, _ = two_saves(f"s3://{bucket}/run")
    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in keys]})
    client.delete_bucket(Bucket=bucket)
    with pytest.raises(ConcurrentWriterError, match=rf"the bucket of s3://{bucket}/run no longer exists") as info:
        manager.save()
    assert "Create the bucket again" in str(info.value)
