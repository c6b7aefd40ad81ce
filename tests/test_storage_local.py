"""Local-disk backend: the storage contract plus what only a file system can show."""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudckpt import open_storage
from cloudckpt.errors import InvalidRangeError, InvalidURLError, NotFoundError, PermissionDeniedError, StorageError
from cloudckpt.storage import Storage
from cloudckpt.storage.base import TEMP_PREFIX
from cloudckpt.storage.local import LocalStorage
from cloudckpt.storage.values import ReadRequest
from cloudckpt.testing.faults import Faults, PrimitiveFaults
from cloudckpt.testing.store_tests import CONTRACT_CONFIG, MULTIPART_SIZE, StorageContract, payload


def local_root(store: Storage) -> Path:
    assert isinstance(store, LocalStorage)
    return store.root


class TestLocalStorage(StorageContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[Storage]:
        storage = LocalStorage(tmp_path / "root", config=CONTRACT_CONFIG)
        yield storage
        storage.close()

    @pytest.fixture
    def faulty(self, tmp_path: Path) -> Iterator[tuple[Storage, Faults]]:
        storage = LocalStorage(tmp_path / "faulty", config=CONTRACT_CONFIG)
        yield storage, PrimitiveFaults(storage, lambda: OSError(errno.EAGAIN, "injected: try again"))
        storage.close()

    @pytest.fixture
    def missing_bucket_store(self, tmp_path: Path) -> Iterator[Storage]:
        storage = LocalStorage(tmp_path / "not" / "created" / "yet", config=CONTRACT_CONFIG)
        yield storage
        storage.close()

    def raw_put(self, store: Storage, key: str, data: bytes) -> None:
        """As another program writes: a new file renamed into place (no cloudckpt xattrs)."""
        path = local_root(store) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(path.name + ".raw-put")
        scratch.write_bytes(data)
        os.replace(scratch, path)

    def raw_get(self, store: Storage, key: str) -> bytes | None:
        path = local_root(store) / key
        return path.read_bytes() if path.is_file() else None

    def raw_keys(self, store: Storage) -> list[str]:
        root = local_root(store)
        return sorted(str(Path(d, name).relative_to(root)) for d, _, names in os.walk(root) for name in names)


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
    store.put("once", b"x", mode="create")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "once", "small"]  # no empty .cloudckpt-tmp/


def test_a_checkpoint_directory_shows_only_checkpoints(tmp_path: Path) -> None:
    """As TensorFlow leaves it: no empty temporary directory after saves."""
    import numpy as np

    import cloudckpt

    manager = cloudckpt.CheckpointManager(cloudckpt.Checkpoint(w=np.arange(10.0)), tmp_path / "run", max_to_keep=2)
    for _ in range(3):
        manager.save()
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert TEMP_PREFIX.rstrip("/") not in names
    assert all(n == "checkpoint" or n.startswith("ckpt-") for n in names), names


def test_concurrent_writers_never_lose_their_temporary_directory(tmp_path: Path) -> None:
    """One writer's tidying removes the directory only when empty; another re-creates it if it raced."""
    store = LocalStorage(tmp_path, config=CONTRACT_CONFIG)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(40):
                store.put(f"w{n}/{i}", b"x" * (i + 1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(store.list("w")) == 8 * 40
    assert not (tmp_path / TEMP_PREFIX).exists()


def test_a_temporary_directory_removed_under_a_writer_is_made_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The race, made certain: another writer tidies the empty directory right after our mkdir."""
    from cloudckpt.storage import local

    real, raced = local._make_dirs, []

    def make_then_lose(directory: Path, url: str) -> None:
        real(directory, url)
        if directory.name == TEMP_PREFIX.rstrip("/") and len(raced) < 2:
            raced.append(directory)
            os.rmdir(directory)

    monkeypatch.setattr(local, "_make_dirs", make_then_lose)
    store = LocalStorage(tmp_path, config=CONTRACT_CONFIG)
    store.put("small", b"x")
    store.put("big", payload(MULTIPART_SIZE))
    assert len(raced) == 2
    assert store.get("small") == b"x" and store.head("big").size == MULTIPART_SIZE


def test_an_emptied_spread_directory_is_removed_and_made_again_if_raced(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting a spread checkpoint's last object removes ``<name>.d/<hh>/`` and ``<name>.d/``
    (a local copy leaves no empty directories); other directories stay; a writer whose spread
    directory is tidied away between its mkdir and its move makes it again."""
    from cloudckpt.storage import local

    store = LocalStorage(tmp_path, config=CONTRACT_CONFIG)
    store.put("run/ck.d/3f/ck.data-00000-of-00002.s", b"a")
    store.put("run/ck.d/a0/ck.data-00001-of-00002.s", b"b")
    store.put("run/plain/x", b"c")
    store.delete(["run/ck.d/3f/ck.data-00000-of-00002.s"])
    assert not (tmp_path / "run/ck.d/3f").exists() and (tmp_path / "run/ck.d/a0").is_dir()
    store.delete(["run/ck.d/a0/ck.data-00001-of-00002.s", "run/plain/x"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["plain"]  # a non-spread directory stays

    real, raced = local._make_dirs, []

    def make_then_lose(directory: Path, url: str) -> None:
        real(directory, url)
        if directory.name == "3f" and len(raced) < 2:
            raced.append(directory)
            os.rmdir(directory)  # another delete's tidying, right after our mkdir

    monkeypatch.setattr(local, "_make_dirs", make_then_lose)
    store.put("run/ck.d/3f/ck.data-00000-of-00002.t", b"again")
    assert len(raced) == 2 and store.get("run/ck.d/3f/ck.data-00000-of-00002.t") == b"again"


def test_a_crashed_writers_temporaries_stay_for_cleanup(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    (tmp_path / TEMP_PREFIX).mkdir()
    (tmp_path / TEMP_PREFIX / "dead.cloudckpt-tmp").write_bytes(b"half")
    store.put("k", b"v")  # tidying never removes another writer's file
    assert [m.key for m in store.list(TEMP_PREFIX)] == [f"{TEMP_PREFIX}dead.cloudckpt-tmp"]
    store.delete(f"{TEMP_PREFIX}dead.cloudckpt-tmp")  # what `cloudckpt gc` does
    assert not (tmp_path / TEMP_PREFIX).exists()


def test_a_path_through_a_file_says_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "model.py").write_text("print('hi')")
    store = LocalStorage(tmp_path / "model.py" / "run")
    blocker = str(tmp_path / "model.py")
    with pytest.raises(StorageError, match=f"{re.escape(blocker)} is a file, not a directory") as info:
        store.put("ckpt-1.index", b"x")
    assert not isinstance(info.value, NotFoundError)
    for read in (lambda: store.get("ckpt-1.index"), lambda: store.head("ckpt-1.index")):
        with pytest.raises(NotFoundError, match="is a file, not a directory"):
            read()
    assert store.exists("ckpt-1.index") is False
    assert (tmp_path / "model.py").read_text() == "print('hi')"


def test_a_directory_that_cannot_be_created_says_why() -> None:
    with pytest.raises(StorageError, match="cannot create directory /proc/cloudckpt-test") as info:
        LocalStorage("/proc/cloudckpt-test/run").put("k", b"x")  # /proc refuses mkdir (ENOENT)
    assert not isinstance(info.value, NotFoundError)
    with pytest.raises(PermissionDeniedError, match="permission denied creating directory /sys/cloudckpt-test"):
        LocalStorage("/sys/cloudckpt-test/run").put("k", b"x")  # sysfs refuses mkdir even to root (EPERM)


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
    assert not (tmp_path / TEMP_PREFIX).exists()


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


def test_a_read_past_the_end_of_a_file_names_where_the_file_really_ends(tmp_path: Path) -> None:
    """A short object (a truncated data file) is reported at its real size, not at the read's start."""
    with open_storage(str(tmp_path)) as store:
        store.put("short", b"x" * 100)
        out = memoryview(bytearray(96))
        with pytest.raises(InvalidRangeError) as caught:
            store.read_into([ReadRequest("short", 4000, out)])
    message = str(caught.value)
    assert "ends at byte 100," in message, message
    assert "96 bytes short" in message and "bytes 4000-4095" in message, message
