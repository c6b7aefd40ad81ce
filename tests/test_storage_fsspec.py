"""The fsspec backend on ``memory://``: the contract, minus what fsspec cannot promise."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cloudckpt import open_storage
from cloudckpt.errors import InvalidURLError
from cloudckpt.storage import Storage
from cloudckpt.storage.fsspec_store import FsspecStorage
from cloudckpt.testing.faults import Faults, PrimitiveFaults
from cloudckpt.testing.store_tests import CONTRACT_CONFIG, StorageContract


def memory_store(root: str) -> FsspecStorage:
    storage = open_storage(f"memory://{root}", config=CONTRACT_CONFIG)
    assert isinstance(storage, FsspecStorage)
    return storage


def fs_path(store: Storage, key: str) -> str:
    """Where ``key`` of ``store`` lives in the file system, from its URL (not from its internals)."""
    root = store.url.partition("://")[2].strip("/")
    return f"{root}/{key}"


class TestMemoryFsspec(StorageContract):
    @pytest.fixture
    def store(self) -> Iterator[Storage]:
        storage = memory_store(f"bucket-{uuid.uuid4().hex[:8]}/prefix")
        yield storage
        storage.close()

    @pytest.fixture
    def faulty(self) -> Iterator[tuple[Storage, Faults]]:
        storage = memory_store(f"faulty-{uuid.uuid4().hex[:8]}/prefix")
        yield storage, PrimitiveFaults(storage, lambda: ConnectionResetError("injected: connection reset"))
        storage.close()

    @pytest.fixture
    def missing_bucket_store(self) -> Iterator[Storage]:
        storage = memory_store(f"never-written-{uuid.uuid4().hex[:8]}/prefix")
        yield storage
        storage.close()

    def raw_put(self, store: Storage, key: str, data: bytes) -> None:
        assert isinstance(store, FsspecStorage)
        store.fs.pipe_file(fs_path(store, key), data)

    def raw_get(self, store: Storage, key: str) -> bytes | None:
        assert isinstance(store, FsspecStorage)
        path = fs_path(store, key)
        return bytes(store.fs.cat_file(path)) if store.fs.isfile(path) else None

    def raw_keys(self, store: Storage) -> list[str]:
        assert isinstance(store, FsspecStorage)
        root = fs_path(store, "")
        try:
            found = store.fs.find(root)
        except FileNotFoundError:
            return []
        return sorted(name.lstrip("/")[len(root.lstrip("/")):] for name in found)

    def test_user_metadata_round_trips(self, store: Storage) -> None:
        store.put("m", b"x", metadata={"purpose": "test"})
        assert store.head("m").metadata == {}  # documented: fsspec stores keep no metadata


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(InvalidURLError, match="nosuchproto"):
        open_storage("nosuchproto://bucket/x")
