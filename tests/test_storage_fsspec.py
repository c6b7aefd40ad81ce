"""The fsspec backend on ``memory://``: the contract, minus what fsspec cannot promise."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cloudckpt import open_storage
from cloudckpt.errors import InvalidURLError, NotSupportedError
from cloudckpt.storage import Storage, UpdateVersion
from cloudckpt.storage.fsspec_store import FsspecStorage
from cloudckpt.testing.store_tests import CONTRACT_CONFIG, MULTIPART_SIZE, StorageContract, payload


class TestMemoryFsspec(StorageContract):
    @pytest.fixture
    def store(self) -> Iterator[Storage]:
        storage = open_storage(f"memory://bucket-{uuid.uuid4().hex[:8]}/prefix", config=CONTRACT_CONFIG)
        assert isinstance(storage, FsspecStorage)
        yield storage
        storage.close()

    # fsspec cannot honour conditional writes: each must refuse clearly, and write nothing.
    def test_create_twice(self, store: Storage) -> None:
        with pytest.raises(NotSupportedError, match="conditional writes"):
            store.put("once", b"first", mode="create")
        assert not store.exists("once")

    def test_create_multipart_twice(self, store: Storage) -> None:
        with pytest.raises(NotSupportedError):
            store.put("once-big", payload(MULTIPART_SIZE), mode="create")

    def test_update_version(self, store: Storage) -> None:
        store.put("v", b"1")
        with pytest.raises(NotSupportedError):
            store.put("v", b"2", mode=UpdateVersion("anything"))
        assert store.get("v") == b"1"

    def test_update_version_of_missing_key(self, store: Storage) -> None:
        with pytest.raises(NotSupportedError):
            store.put("absent", b"x", mode=UpdateVersion("1"))

    def test_compare_and_swap_race_loses_no_increment(self, store: Storage) -> None:
        with pytest.raises(NotSupportedError):
            store.put("counter", b"1", mode=UpdateVersion("0"))

    def test_user_metadata_round_trips(self, store: Storage) -> None:
        store.put("m", b"x", metadata={"purpose": "test"})
        assert store.head("m").metadata == {}  # documented: fsspec stores keep no metadata


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(InvalidURLError, match="nosuchproto"):
        open_storage("nosuchproto://bucket/x")
