"""boto3 clients for S3: one per configuration and process, set up for S3-compatible stores.

Cached by endpoint, region, pool size and addressing style, rebuilt in a forked child (a
boto3 client's connection pool must not be shared across ``fork``); botocore's own retries
and per-request checksums are off (``s3.py`` says why).

Why botocore's session, not boto3's: a client is what boto3 builds on a botocore session, and
building one is most of a process's first request (issue 27: 0.06-0.15 s loading the service
model and endpoint rules, more through ``boto3.session.Session``, whose import also brings in
boto3 and s3transfer). Each client's botocore session shares one data loader, so a second
client (another pool size, endpoint or region) reuses the parsed models; ``warm_client``
starts the first build on a background thread as soon as a storage is opened, so it overlaps
whatever the caller does before its first request.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from cloudckpt.storage.extras import missing_extra

try:
    import botocore.session
    from botocore.config import Config
except ImportError as _missing:  # boto3 is the install extra cloudckpt[s3]
    raise missing_extra("s3", _missing) from _missing

from cloudckpt.storage.clients import ProcessLocalCache


@dataclass(frozen=True, slots=True)
class ClientKey:
    endpoint_url: str | None
    env_endpoint: str | None  # what botocore will read from the environment, when not given
    region_name: str | None
    pool_size: int
    path_style: bool


_clients: ProcessLocalCache[ClientKey, Any] = ProcessLocalCache()


def configured_endpoint() -> str | None:
    """The endpoint botocore will pick up from the environment, if any.

    botocore reads ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` itself; we only look so
    that a custom endpoint gets path-style addressing (``http://host/bucket/key``), which
    every S3-compatible store understands, unlike ``http://bucket.host/key``.
    """
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def client_key(endpoint_url: str | None, region_name: str | None, pool_size: int) -> ClientKey:
    env_endpoint = None if endpoint_url else configured_endpoint()
    return ClientKey(endpoint_url, env_endpoint, region_name, pool_size,
                     path_style=bool(endpoint_url or env_endpoint))


def shared_client(endpoint_url: str | None, region_name: str | None, pool_size: int) -> Any:
    """The process-wide boto3 S3 client for these settings (created on first use)."""
    key = client_key(endpoint_url, region_name, pool_size)
    return _clients.get(key, lambda: new_client(key))


def warm_client(endpoint_url: str | None, region_name: str | None, pool_size: int) -> None:
    """Start building ``shared_client``'s client on a background thread unless it exists or is being built.

    The first ``shared_client`` call then waits only for what is left of that build. A build
    that fails there is run again by that call, which raises its error.
    """
    key = client_key(endpoint_url, region_name, pool_size)
    _clients.warm(key, lambda: new_client(key), name="cloudckpt-s3-client")


_loader_lock = threading.Lock()
_loader: list[Any] = []  # the process's botocore data loader, once made (emptied in a forked child)


def _forget_loader() -> None:
    global _loader_lock
    _loader_lock = threading.Lock()
    _loader.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loader)


def create_client(region_name: str | None, endpoint_url: str | None, config: Config) -> Any:
    """A new S3 client on a fresh botocore session that shares the process's data loader.

    A fresh session per client, as ``boto3.session.Session`` gave: each resolves (and later
    refreshes) credentials, profile and region from the standard chain as they are when the
    client is built, without freezing them. The loader is shared: it caches the service model
    and endpoint rules it parsed, so a second client skips that (about half a client's build).
    Built under a lock: neither a session nor a loader is documented as safe to use from
    several threads at once (the clients are).
    """
    with _loader_lock:
        session = botocore.session.get_session()
        if _loader:
            session.register_component("data_loader", _loader[0])
        else:
            _loader.append(session.get_component("data_loader"))
        return session.create_client("s3", region_name=region_name, endpoint_url=endpoint_url, config=config)


def new_client(key: ClientKey) -> Any:
    config = Config(
        # One retry layer: ours (base.Storage._call). Note ``max_attempts`` would count
        # *retries* (1 -> two tries); ``total_max_attempts`` counts tries.
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=key.pool_size,
        # botocore >= 1.36 defaults to "when_supported": it adds a CRC32 to every upload,
        # sent as an aws-chunked body with a trailer. Several S3-compatible stores reject
        # or mangle that encoding, and hashing every payload in Python costs CPU that a
        # small training VM does not have. We send our own precomputed CRC32C instead.
        request_checksum_calculation="when_required",
        # Likewise for reads: no per-GET hashing in Python; restore verifies the CRC32C
        # recorded per leaf in the checkpoint index, end to end.
        response_checksum_validation="when_required",
        s3={
            "addressing_style": "path" if key.path_style else "auto",
            # SigV4 would SHA-256 the whole body over plain http (and over https unless a
            # checksum header it recognises is present): pure CPU cost. Integrity comes
            # from the CRC32C the store verifies; TLS protects https endpoints.
            "payload_signing_enabled": False,
        },
        user_agent_extra="cloudckpt",
    )
    client = create_client(key.region_name, key.endpoint_url, config)
    _send_in_large_blocks(client)
    return client


#: Bytes per ``sendall`` when a request body streams from the caller's buffers.
SEND_BLOCK = 1024 * 1024


def _send_in_large_blocks(client: Any) -> None:
    """Hand request bodies to the socket ``SEND_BLOCK`` bytes at a time, not 128 KiB.

    http.client reads a streamed body ``blocksize`` bytes at a time and passes each block to
    ``sendall``; botocore sets 128 KiB on the connection pools it makes. Per block that is a
    Python read, a ``sendall`` and (over TLS) an ``SSL_write``: measured on SeaweedFS (issue 27,
    512 MiB ``put``, 32 MiB parts x 4) 1 MiB blocks cost 0.57 instead of 0.64 client CPU-s/GiB
    over HTTPS and 0.30 instead of 0.33 over HTTP. The pool manager is botocore's internal
    (``_endpoint.http_session._manager``); where a botocore release moves it, clients keep its
    default - slower, never wrong. Proxied connections keep it too.
    """
    manager = getattr(getattr(getattr(client, "_endpoint", None), "http_session", None), "_manager", None)
    pool_kw = getattr(manager, "connection_pool_kw", None)
    if isinstance(pool_kw, dict):
        pool_kw["blocksize"] = SEND_BLOCK
