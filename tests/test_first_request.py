"""The first request of a process (issue 27): what it waits for, counted rather than timed.

A fresh process's first save or restore used to wait, in turn, for the boto3 client to be
built (after importing boto3) and, on a save, for the conditional-write probe in front of its
commit. Each test pins one of the changes that took work off that path; each fails if
that change is undone (``bench cpu --first`` measures the latency itself).
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import botocore.loaders
import numpy as np
import pytest
import servers
from conftest import unique_name

import cloudckpt
from cloudckpt.format import index_fetch
from cloudckpt.storage import TransferConfig, register_storage, unregister_storage
from cloudckpt.storage import s3_client as s3_client_module
from cloudckpt.storage.clients import CAPABILITIES
from cloudckpt.storage.s3 import S3Storage

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def bucket(seaweedfs: servers.Server) -> str:
    name = unique_name("first")
    servers.create_bucket(seaweedfs.endpoint, name)
    return name


_pool_sizes = itertools.count(1000)


def _unique_config() -> TransferConfig:
    """A pool size no other test uses: the store gets a client key of its own (a fresh build)."""
    return TransferConfig(max_concurrency=next(_pool_sizes))


def _record_operations(store: S3Storage) -> list[tuple[str, str]]:
    """Every request the store's client sends from now on, as ``(operation, key)``."""
    sent: list[tuple[str, str]] = []

    def record(model: Any, params: Any, **_: Any) -> None:
        sent.append((model.name, str(params.get("Key", ""))))

    store.client.meta.events.register("provide-client-params.s3.*", record)
    return sent


def test_opening_a_store_builds_its_client_in_the_background(seaweedfs: servers.Server, bucket: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The client is built once, on a background thread started by the constructor, not by the first request."""
    built_on: list[str] = []
    real = s3_client_module.new_client

    def spy(key: s3_client_module.ClientKey) -> Any:
        built_on.append(threading.current_thread().name)
        return real(key)

    monkeypatch.setattr(s3_client_module, "new_client", spy)
    store = S3Storage(f"s3://{bucket}/{unique_name('bg')}", endpoint_url=seaweedfs.endpoint,
                      config=_unique_config())
    store.put("a", b"x")
    assert store.get("a") == b"x"
    assert built_on == ["cloudckpt-s3-client"]


def test_a_second_client_reuses_the_parsed_service_model(seaweedfs: servers.Server,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients share one botocore loader: a second one (another key) parses no model file again."""
    s3_client_module.new_client(s3_client_module.ClientKey(seaweedfs.endpoint, None, None, 2001, True))
    loaded: list[str] = []
    real = botocore.loaders.JSONFileLoader.load_file

    def spy(self: Any, file_path: str) -> Any:
        loaded.append(file_path)
        return real(self, file_path)

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", spy)
    client = s3_client_module.new_client(s3_client_module.ClientKey(seaweedfs.endpoint, None, None, 2002, True))
    assert client.meta.service_model.service_name == "s3"
    assert not [p for p in loaded if "service-2" in p or "endpoint-rule-set" in p], loaded


def test_heading_an_index_starts_the_conditional_write_probe(seaweedfs: servers.Server, bucket: str) -> None:
    """A save HEADs its index first: the probe its commit needs starts then, on its own thread."""
    # A prefix of its own is not enough (the answer is per bucket): a bucket no test probed yet.
    fresh = unique_name("probe")
    servers.create_bucket(seaweedfs.endpoint, fresh)
    store = S3Storage(f"s3://{fresh}/p", endpoint_url=seaweedfs.endpoint)
    key = (*store._store_identity(), "conditional PUT")
    assert CAPABILITIES.peek(key) is None
    assert index_fetch.head_index(store, "ckpt") is None

    def not_started() -> bool:
        raise AssertionError("head_index did not start the conditional-write probe")

    assert CAPABILITIES.get(key, not_started) is True  # waits for the background probe's answer
    assert store.list("") == []  # and it left no scratch object


def test_a_restore_sends_no_conditional_write_probe(seaweedfs: servers.Server) -> None:
    """A restore reads: the probe ``head_index`` starts for writers never runs on its path."""
    fresh = unique_name("restore")
    servers.create_bucket(seaweedfs.endpoint, fresh)
    writer = S3Storage(f"s3://{fresh}/w", endpoint_url=seaweedfs.endpoint, check_conditional_writes=False)
    state: dict[str, np.ndarray] = {"w": np.arange(1000, dtype=np.float32)}
    register_storage(writer)
    try:
        cloudckpt.Checkpoint(state=state).write(f"{writer.url}/c")
    finally:
        unregister_storage(writer)
    reader = S3Storage(f"s3://{fresh}/w", endpoint_url=seaweedfs.endpoint)
    sent = _record_operations(reader)
    register_storage(reader)
    try:
        dest = {k: np.zeros_like(v) for k, v in state.items()}
        cloudckpt.Checkpoint(state=dest).read(f"{reader.url}/c").assert_consumed()
    finally:
        unregister_storage(reader)
    np.testing.assert_array_equal(dest["w"], state["w"])
    assert CAPABILITIES.peek((*reader._store_identity(), "conditional PUT")) is None
    assert [op for op, _ in sent if op != "GetObject"] == [], sent
