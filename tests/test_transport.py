"""How the S3 backend moves bytes (issue 27): GET bodies read straight into the destination,
request bodies sent in large blocks, connections reused, and a checkpoint over HTTPS.

What these tests pin is the data plane's shape, not its speed (``bench cpu`` measures that):
each asserts a property that the slower path would break.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import servers
import urllib3.response
from conftest import unique_name

import cloudckpt
from cloudckpt.storage import ReadRequest, Storage, TransferConfig, register_storage, unregister_storage
from cloudckpt.storage.s3 import S3Storage
from cloudckpt.storage.s3_client import SEND_BLOCK

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
#: Small parts and ranges, so a few MiB make several requests (and several pooled connections).
CONFIG = TransferConfig(multipart_threshold=5 * MiB, part_size=5 * MiB, read_chunk_size=2 * MiB, max_concurrency=2)


@pytest.fixture(scope="module")
def bucket(seaweedfs: servers.Server) -> str:
    name = unique_name("transport")
    servers.create_bucket(seaweedfs.endpoint, name)
    return name


@pytest.fixture(params=["http", "https"])
def store(request: pytest.FixtureRequest, seaweedfs: servers.Server, bucket: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    """A store over plain HTTP and one over HTTPS (the run-time CA as ``AWS_CA_BUNDLE``)."""
    endpoint = seaweedfs.endpoint
    if request.param == "https":
        assert seaweedfs.https_endpoint is not None
        monkeypatch.setenv("AWS_CA_BUNDLE", str(seaweedfs.ca_bundle))
        endpoint = seaweedfs.https_endpoint
    store = S3Storage(f"s3://{bucket}/{unique_name(request.param)}", endpoint_url=endpoint, config=CONFIG)
    assert str(store.client.meta.endpoint_url).startswith(f"{request.param}://")
    yield store
    store.close()


def _pools(store: S3Storage) -> list[Any]:
    manager = store.client._endpoint.http_session._manager
    return list(manager.pools._container.values())


def test_reads_fill_the_destination_without_urllib3s_copy(store: S3Storage,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3's ``read`` (a fresh ``bytes`` per call, then a copy) is never on a ranged read's path."""
    data = np.random.default_rng(1).integers(0, 256, 7 * MiB + 3, dtype=np.uint8)
    store.put("obj", data)

    def no_read(*_args: Any, **_kwargs: Any) -> bytes:
        raise AssertionError("urllib3 HTTPResponse.read called: the body was copied")

    monkeypatch.setattr(urllib3.response.HTTPResponse, "read", no_read)
    out = np.zeros_like(data)
    head = np.zeros(5, dtype=np.uint8)
    store.read_into([ReadRequest("obj", 0, out.data), ReadRequest("obj", 11, head.data)])
    assert np.array_equal(out, data) and np.array_equal(head, data[11:16])


def test_connections_are_reused_after_direct_reads(store: S3Storage) -> None:
    """A response read to its end goes back to the pool: many ranged reads, few connections."""
    data = np.random.default_rng(2).integers(0, 256, 6 * MiB, dtype=np.uint8)
    store.put("obj", data)
    out = np.zeros_like(data)
    before = sum(pool.num_connections for pool in _pools(store))  # the client is shared: count new ones
    for _ in range(5):  # 3 ranges each: 15 GETs
        out[:] = 0
        store.read_into([ReadRequest("obj", 0, out.data)])
        assert np.array_equal(out, data)
    made = sum(pool.num_connections for pool in _pools(store)) - before
    assert made <= CONFIG.max_concurrency, f"{made} new connections for 15 GETs: responses were not released"


def test_a_short_object_is_an_error_not_a_reused_connection(store: S3Storage) -> None:
    """Asking past the end still fails with the key named, and the store keeps working."""
    store.put("short", b"0123456789")
    out = bytearray(20)
    with pytest.raises(cloudckpt.errors.InvalidRangeError, match="short"):
        store.read_into([ReadRequest("short", 0, memoryview(out))])
    assert store.get("short") == b"0123456789"


def test_request_bodies_go_to_the_socket_in_large_blocks(store: S3Storage) -> None:
    """botocore's pools send 128 KiB per ``sendall``; ours are set to ``SEND_BLOCK``."""
    data = np.random.default_rng(3).integers(0, 256, 6 * MiB, dtype=np.uint8)
    store.put("multipart", data)  # parts above the 1 MiB bytes-join: streamed from the buffer
    assert store.get("multipart") == data.tobytes()
    connections = [conn for pool in _pools(store) for conn in list(pool.pool.queue) if conn is not None]
    assert connections and {conn.blocksize for conn in connections} == {SEND_BLOCK}


def test_a_checkpoint_over_https_commits_conditionally(seaweedfs: servers.Server, bucket: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Save, restore and the create-if-absent commit over TLS, through the public API."""
    assert seaweedfs.https_endpoint is not None
    monkeypatch.setenv("AWS_CA_BUNDLE", str(seaweedfs.ca_bundle))
    storage: Storage = S3Storage(f"s3://{bucket}/{unique_name('ckpt')}", endpoint_url=seaweedfs.https_endpoint,
                                 config=CONFIG)
    register_storage(storage)
    try:
        state: dict[str, np.ndarray[Any, Any]] = {"w": np.arange(3 * MiB, dtype=np.float32), "b": np.ones(7)}
        path = cloudckpt.Checkpoint(state=state).write(f"{storage.url}/ckpt")
        dest = {k: np.zeros_like(v) for k, v in state.items()}
        cloudckpt.Checkpoint(state=dest).read(path).assert_consumed()
        assert all(np.array_equal(dest[k], state[k]) for k in state)
        index = storage.head("ckpt.index")
        with pytest.raises(cloudckpt.errors.PreconditionError):
            storage.put("ckpt.index", b"{}", mode="create")  # the commit's condition, enforced over TLS
        assert storage.head("ckpt.index").version == index.version
    finally:
        unregister_storage(storage)
        storage.close()


def test_gcs_reads_fill_the_destination_without_urllib3s_copy(gcs_bucket: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """GCS's ranged reads take the same direct path (``requests`` streams through urllib3 too)."""
    from cloudckpt.storage.gcs import GCSStorage

    store = GCSStorage(f"gs://{gcs_bucket}/{unique_name('direct')}", config=CONFIG)
    data = np.random.default_rng(4).integers(0, 256, 5 * MiB + 7, dtype=np.uint8)
    store.put("obj", data)
    monkeypatch.setattr(urllib3.response.HTTPResponse, "read", lambda *_a, **_k: pytest.fail("urllib3 read: a copy"))
    out = np.zeros_like(data)
    for _ in range(3):
        out[:] = 0
        store.read_into([ReadRequest("obj", 0, out.data)])
        assert np.array_equal(out, data)
    store.close()
