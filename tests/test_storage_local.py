"""Local-disk backend: the storage contract plus what only a file system can show."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudckpt import open_storage
from cloudckpt.errors import InvalidURLError, NotFoundError, StorageError
from cloudckpt.storage import Storage
from cloudckpt.storage.base import TEMP_PREFIX
from cloudckpt.storage.local import LocalStorage
from cloudckpt.testing.store_tests import CONTRACT_CONFIG, MULTIPART_SIZE, StorageContract, payload


class TestLocalStorage(StorageContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Storage]:
        storage = LocalStorage(tmp_path / "root", config=CONTRACT_CONFIG)
        yield storage
        storage.close()


def test_open_storage_picks_local_for_paths_and_file_urls(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(f"file://{tmp_path}/").url == str(tmp_path)
    with pytest.raises(InvalidURLError, match="absolute"):
        open_storage("file://relative/path")


def test_no_temporary_files_survive_a_write(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path, config=CONTRACT_CONFIG)
    store.put("small", b"x")
    store.put("big", payload(MULTIPART_SIZE))
    assert list((tmp_path / TEMP_PREFIX).iterdir()) == []


def test_failed_multipart_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudckpt.storage import local

    calls = 0
    real = local._LocalMultipart.upload_part

    def failing(self: local._LocalMultipart, index: int, data: list[memoryview]) -> None:
        nonlocal calls
        calls += 1
        if index == 1:
            raise OSError(28, "No space left on device")
        real(self, index, data)

    monkeypatch.setattr(local._LocalMultipart, "upload_part", failing)
    store = LocalStorage(tmp_path, config=CONTRACT_CONFIG)
    with pytest.raises(StorageError, match="No space left on device"):
        store.put("big", payload(MULTIPART_SIZE))
    assert calls >= 2
    assert not store.exists("big")
    assert list((tmp_path / TEMP_PREFIX).iterdir()) == []


def test_a_leftover_temp_file_is_never_an_object(tmp_path: Path) -> None:
    """A SIGKILL mid-write leaves a temp file; the key it was for stays absent."""
    store = LocalStorage(tmp_path)
    (tmp_path / TEMP_PREFIX).mkdir()
    (tmp_path / TEMP_PREFIX / "dead.cloudckpt-tmp").write_bytes(b"half")
    with pytest.raises(NotFoundError):
        store.get("ckpt-1.index")
    assert [m.key for m in store.list("ckpt")] == []


def test_directory_is_not_an_object(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("dir/file", b"x")
    with pytest.raises(NotFoundError):
        store.get("dir")
    with pytest.raises(NotFoundError):
        store.head("dir")


def test_version_changes_on_every_write_even_with_same_size(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    versions = {store.put("v", b"same").version for _ in range(20)}
    assert len(versions) == 20


def test_objects_are_created_with_parent_directories(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "does" / "not" / "exist")
    store.put("a/b/c", b"deep")
    assert (tmp_path / "does" / "not" / "exist" / "a" / "b" / "c").read_bytes() == b"deep"
    assert oct(os.stat(tmp_path / "does" / "not" / "exist" / "a" / "b" / "c").st_mode & 0o777) == "0o644"


def test_short_preadv_returns_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``preadv`` may fill less than asked (signals, some file systems): the read goes on where it stopped."""
    import numpy as np

    from cloudckpt.storage import ReadRequest

    store = LocalStorage(tmp_path, config=CONTRACT_CONFIG)
    data = payload(100_000, seed=9)
    store.put("obj", data)
    plain = os.preadv
    calls = []

    def stingy(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(len(buffers))
        first = buffers[0]
        return plain(fd, [first[:min(first.nbytes, 777)]], offset)  # at most 777 bytes of the first buffer

    monkeypatch.setattr(os, "preadv", stingy)
    bounds = [(0, 5), (5, 1000), (1000, 1001), (1001, 60_000), (60_000, 100_000)]
    outs = [np.zeros(end - start, np.uint8) for start, end in bounds]
    store.read_into([ReadRequest("obj", start, out.data) for (start, _), out in zip(bounds, outs, strict=True)])
    assert b"".join(out.tobytes() for out in outs) == data
    assert max(calls) == 5 and len(calls) > 100  # one vectored call for the run, continued many times
    with pytest.raises(StorageError, match="short"):
        store.read_into([ReadRequest("obj", 99_000, memoryview(bytearray(2000)))])
