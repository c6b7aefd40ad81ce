"""Cleanup of crashed saves' leftovers (cloudckpt/manager/cleanup.py) on local disk, SeaweedFS and fake-gcs-server.

Each test plants what SIGKILLed saves leave behind next to a committed checkpoint - data
objects no index names, a temporary chunk under ``TEMP_PREFIX``, on S3 an incomplete
multipart upload - plus things cleanup must never touch: the committed checkpoint, the
data of an index that cannot be decoded, a sub-directory (another run), objects that are
not ours. Why every backend: each lists, stamps and hides temporaries differently, and the
ages must come from the store's own clock.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import numpy as np
import pytest

from cloudckpt import Checkpoint, Variable
from cloudckpt.format import decode_index, index_key
from cloudckpt.format.state_file import STATE_KEY
from cloudckpt.manager import CheckpointManager
from cloudckpt.manager import cleanup as leftovers_module
from cloudckpt.manager.cleanup import find_leftovers, remove_leftovers
from cloudckpt.storage import Storage, join_url, open_storage
from cloudckpt.storage.base import TEMP_PREFIX, TEMP_SUFFIX

VALUES = np.arange(1000, dtype=np.float64) * 0.25
ZERO = timedelta(0)
HOUR = timedelta(hours=1)
CLOCK_WAIT = 10.0  # seconds; the store's clock lags an object's stamp by < 1 s


def suffix() -> str:
    """A write-unique data-object suffix, as ``plan_write`` makes them."""
    return uuid.uuid4().hex[:16]


@dataclass
class Planted:
    """What ``plant`` put in the directory."""

    expected: set[tuple[str, str]]              # (kind, key) of every leftover of a crashed save
    kept: list[str]                             # keys cleanup must never remove
    sub_upload: tuple[str, str] | None = None   # S3: an incomplete upload in a sub-directory
    uploads: list[tuple[str, str]] = field(default_factory=list)  # S3: (full key, upload id) planted


def _s3_location(directory: str) -> tuple[Any, str, str]:
    """boto3 client, bucket and key prefix of an ``s3://bucket/prefix`` directory."""
    bucket, _, prefix = directory[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    return client, bucket, prefix.strip("/") + "/"


def _start_multipart(directory: str, key: str) -> tuple[str, str]:
    """An upload a SIGKILLed writer began and never completed or aborted (one part up)."""
    client, bucket, prefix = _s3_location(directory)
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=prefix + key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=prefix + key, UploadId=upload_id, PartNumber=1, Body=b"p" * 1024)
    return prefix + key, upload_id


def _pending_uploads(directory: str) -> set[str]:
    """Upload ids of every incomplete multipart upload in the bucket (not just the directory)."""
    client, bucket, _ = _s3_location(directory)
    return {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", ())}


def save_committed(directory: str) -> list[str]:
    """``ckpt-1`` by a manager (state file included); returns its index and data keys."""
    manager = CheckpointManager(Checkpoint(v=Variable(VALUES.copy())), directory, max_to_keep=None,
                                leftover_min_age=None)
    manager.save()
    storage = open_storage(directory)
    index = decode_index(storage.get(index_key("ckpt-1")), "ckpt-1", directory)
    return [index_key("ckpt-1"), *(obj.name for obj in index.objects)]


def wait_for_server_clock(storage: Storage) -> None:
    """Wait (bounded) until the store's clock has passed the newest object's stamp.

    Why: an HTTP ``Date`` header has whole seconds while GCS stamps objects to the
    microsecond, so for up to a second a fresh object is "from the future" by the store's
    own clock. Waiting makes "older than 0" true by that clock itself, so the tests do not
    depend on how ``find_leftovers`` treats such negative ages.
    """
    stamps = [m.last_modified for m in [*storage.list(), *storage.list(TEMP_PREFIX)] if m.last_modified]
    uploads = getattr(storage, "list_multipart_uploads", None)
    if uploads is not None:
        stamps.extend(u.initiated for u in uploads(""))
    newest = max(stamps)
    deadline = time.monotonic() + CLOCK_WAIT
    while storage.server_time() < newest:
        assert time.monotonic() < deadline, f"{storage.url}: server clock never reached {newest}"
        time.sleep(0.1)


def plant(directory: str, *, sub_upload: bool = False) -> Planted:
    """A committed checkpoint, the leftovers of crashed saves, and what must survive cleanup.

    ``sub_upload`` adds (on S3) an incomplete multipart upload in a sub-directory: another
    run's save, possibly still in flight, that this directory's cleanup must not abort.
    """
    committed = save_committed(directory)
    storage = open_storage(directory)
    crashed = [f"ckpt-2.data-0000{k}-of-00002.{suffix()}" for k in range(2)]   # save 2 died before its index
    stray = f"ckpt-1.data-00000-of-00001.{suffix()}"  # a crashed re-save of ckpt-1: not what its index names
    temporary = f"{TEMP_PREFIX}{uuid.uuid4().hex}/part-000001{TEMP_SUFFIX}"
    for key in [*crashed, stray, temporary]:
        storage.put(key, b"x" * 100)
    unreadable = ["ckpt-5.index", f"ckpt-5.data-00000-of-00001.{suffix()}"]  # torn or foreign index
    other_run = [f"other-run/ckpt-2.data-00000-of-00001.{suffix()}",
                 f"other-run/{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}", "other-run/ckpt-2.index"]
    not_ours = ["notes.txt", "ckpt-3.data-not-a-data-object"]
    for key in [*unreadable, *other_run, *not_ours]:
        storage.put(key, b"{ this is not an index")
    planted = Planted(
        expected={("unreferenced-data", k) for k in [*crashed, stray]} | {("temporary", temporary)},
        kept=[*committed, STATE_KEY, *unreadable, *other_run, *not_ours])
    if directory.startswith("s3://"):
        key = f"ckpt-3.data-00000-of-00001.{suffix()}"
        planted.uploads.append(_start_multipart(directory, key))
        planted.expected.add(("multipart-upload", key))
        if sub_upload:
            planted.sub_upload = _start_multipart(directory, f"other-run/ckpt-3.data-00000-of-00001.{suffix()}")
    wait_for_server_clock(storage)
    return planted


def found_set(storage: Storage, min_age: timedelta) -> set[tuple[str, str]]:
    return {(item.kind, item.key) for item in find_leftovers(storage, min_age=min_age)}


def assert_kept(directory: str, planted: Planted) -> None:
    """Nothing cleanup must spare is gone, and the committed checkpoint restores exactly."""
    storage = open_storage(directory)
    missing = [key for key in planted.kept if not storage.exists(key)]
    assert not missing, f"cleanup removed {missing}"
    if planted.sub_upload is not None:
        assert planted.sub_upload[1] in _pending_uploads(directory), "cleanup aborted another run's multipart upload"
    live = Variable(np.zeros_like(VALUES))
    Checkpoint(v=live).restore(join_url(directory, "ckpt-1"))
    np.testing.assert_array_equal(live.numpy(), VALUES)


def assert_gone(directory: str, planted: Planted) -> None:
    """Every planted leftover was removed (objects deleted, uploads aborted)."""
    storage = open_storage(directory)
    still = [key for kind, key in planted.expected if kind != "multipart-upload" and storage.exists(key)]
    assert not still, f"leftovers not removed: {still}"
    if planted.uploads:
        pending = _pending_uploads(directory)
        assert not [u for _, u in planted.uploads if u in pending], "stale multipart upload not aborted"


# ---------------------------------------------------------------------------- find / remove
def test_young_leftovers_are_not_found(root: str) -> None:
    """Anything younger than ``min_age`` may still be uploading (another writer, a zombie VM)."""
    plant(root)
    assert find_leftovers(open_storage(root), min_age=HOUR) == []


def test_exactly_the_leftovers_are_found_and_removed(root: str) -> None:
    planted = plant(root)
    storage = open_storage(root)
    found = find_leftovers(storage, min_age=ZERO)
    assert {(item.kind, item.key) for item in found} == planted.expected
    assert all(ZERO <= item.age < HOUR for item in found), [(item.key, item.age) for item in found]
    assert all(item.size == 100 for item in found if item.kind != "multipart-upload")

    removal = remove_leftovers(storage, found)
    assert removal.failed == ()
    assert removal.removed == len(planted.expected)
    assert removal.bytes == 100 * sum(1 for kind, _ in planted.expected if kind != "multipart-upload")
    assert find_leftovers(storage, min_age=ZERO) == []
    assert_gone(root, planted)
    assert_kept(root, planted)


def test_ages_are_measured_by_the_servers_clock(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM's clock may be off by minutes or days; only the store's stamped the objects."""
    planted = plant(root)
    storage = open_storage(root)
    server_now = storage.server_time()
    # The store says "a day ago": every object is from its future, none is even a second old.
    monkeypatch.setattr(storage, "server_time", lambda: server_now - timedelta(days=1))
    assert find_leftovers(storage, min_age=timedelta(seconds=1)) == []
    # The store says "in two days": everything is two days old.
    monkeypatch.setattr(storage, "server_time", lambda: server_now + timedelta(days=2))
    assert found_set(storage, timedelta(days=1)) == planted.expected

    class SkewedClock(datetime):
        """Our clock a month ahead: must change nothing."""

        @classmethod
        def now(cls, tz: Any = None) -> SkewedClock:
            return datetime.now(tz or timezone.utc) + timedelta(days=30)  # type: ignore[return-value]

        @classmethod
        def utcnow(cls) -> SkewedClock:
            return datetime.utcnow() + timedelta(days=30)  # type: ignore[return-value]

    monkeypatch.setattr(leftovers_module, "datetime", SkewedClock)
    assert find_leftovers(open_storage(root), min_age=timedelta(days=1)) == []


def test_sub_directories_are_untouched(root: str) -> None:
    """A sub-directory is another run (``run/eval``): its objects and uploads are its own business."""
    planted = plant(root, sub_upload=True)
    storage = open_storage(root)
    found = find_leftovers(storage, min_age=ZERO)
    assert not [item.key for item in found if "/" in item.key and not item.key.startswith(TEMP_PREFIX)], \
        f"cleanup of {root} reaches into a sub-directory: {sorted((i.kind, i.key) for i in found)}"
    assert remove_leftovers(storage, found).failed == ()
    assert_kept(root, planted)


def test_a_save_committed_after_the_listing_keeps_its_data(root: str) -> None:
    """``remove_leftovers`` re-reads the index: a commit between find and remove wins."""
    planted = plant(root)
    storage = open_storage(root)
    Checkpoint(v=Variable(VALUES * 2)).write(join_url(root, "ckpt-7"))
    index = storage.get(index_key("ckpt-7"))
    data = [obj.name for obj in decode_index(index, "ckpt-7", root).objects]
    storage.delete(index_key("ckpt-7"))               # as if ckpt-7 were still uploading ...
    wait_for_server_clock(storage)
    found = find_leftovers(storage, min_age=ZERO)
    assert {("unreferenced-data", key) for key in data} <= {(item.kind, item.key) for item in found}
    storage.put(index_key("ckpt-7"), index)           # ... and committed right after the listing
    assert remove_leftovers(storage, found).failed == ()
    assert all(storage.exists(key) for key in data), "data of a just-committed checkpoint was removed"
    live = Variable(np.zeros_like(VALUES))
    Checkpoint(v=live).read(join_url(root, "ckpt-7"))
    np.testing.assert_array_equal(live.numpy(), VALUES * 2)
    assert_gone(root, planted)
    assert_kept(root, planted)


def test_negative_ages_are_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="min_age"):
        find_leftovers(open_storage(tmp_path), min_age=-timedelta(seconds=1))
    with pytest.raises(ValueError, match="leftover_min_age"):
        CheckpointManager(Checkpoint(), tmp_path, max_to_keep=1, leftover_min_age=-1)


# ---------------------------------------------------------------------------- the manager's first save
def test_managers_first_save_removes_old_leftovers_once(root: str) -> None:
    planted = plant(root)
    manager = CheckpointManager(Checkpoint(v=Variable(VALUES + 1)), root, max_to_keep=None, leftover_min_age=0)
    manager.save(checkpoint_number=10)
    storage = open_storage(root)
    assert find_leftovers(storage, min_age=ZERO) == []
    assert_gone(root, planted)
    assert_kept(root, planted)
    assert storage.exists(index_key("ckpt-10"))
    # Only the first save cleans up: a later crash's bytes wait for the next manager.
    later = f"ckpt-11.data-00000-of-00001.{suffix()}"
    storage.put(later, b"y")
    wait_for_server_clock(storage)
    manager.save(checkpoint_number=12)
    assert storage.exists(later)
    assert found_set(storage, ZERO) == {("unreferenced-data", later)}


@pytest.mark.parametrize("age", ["default", "disabled"])
def test_managers_first_save_keeps_young_leftovers(root: str, age: str) -> None:
    """The default age (1 hour) spares a save that may still be in flight; ``None`` turns cleanup off."""
    planted = plant(root)
    kwargs: dict[str, Any] = {} if age == "default" else {"leftover_min_age": None}
    manager = CheckpointManager(Checkpoint(v=Variable(VALUES + 1)), root, max_to_keep=None, **kwargs)
    manager.save(checkpoint_number=10)
    assert found_set(open_storage(root), ZERO) == planted.expected
    assert_kept(root, planted)
