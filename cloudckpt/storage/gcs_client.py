"""The GCS client factory and what every GCS request shares: its timeout, the process-wide
clients, the raw-request helpers and object metadata read from a blob or a JSON resource.

Split out of ``gcs`` (issue 23) so the data plane, the composite upload and the error
translation all build on one small module that owns the SDK's client and resource types.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from cloudckpt.storage.extras import missing_extra

try:
    import google.cloud.storage as gcs
    import requests
    from google.api_core import exceptions as api_exceptions
    from google.api_core.datetime_helpers import from_rfc3339
    from google.auth.credentials import AnonymousCredentials, Credentials
except ImportError as _missing:  # google-cloud-storage is the install extra cloudckpt[gcs]
    raise missing_extra("gcs", _missing) from _missing

from cloudckpt.storage.clients import ProcessLocalCache
from cloudckpt.storage.values import ObjectMeta

#: (connect, read) seconds for every request; a stalled connection becomes a retryable
#: timeout instead of a hang.
TIMEOUT = (30.0, 120.0)
#: Project name used against an emulator, which needs one but checks none.
EMULATOR_PROJECT = "cloudckpt-emulator"


def build_client(project: str | None, credentials: Credentials | None, emulator: str | None) -> gcs.Client:
    """Against an emulator: anonymous credentials and a dummy project; else google-auth's chain."""
    if emulator is not None:
        return gcs.Client(project=project or EMULATOR_PROJECT,
                          credentials=credentials or AnonymousCredentials())  # type: ignore[no-untyped-call]
    return gcs.Client(project=project, credentials=credentials)


#: (emulator host, project, credentials) -> client, one per process.
CLIENTS: ProcessLocalCache[tuple[Any, ...], gcs.Client] = ProcessLocalCache()


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        parsed: datetime = from_rfc3339(value)  # type: ignore[no-untyped-call]
        return parsed
    return None


def meta_from_resource(resource: Mapping[str, Any]) -> ObjectMeta:
    """ObjectMeta from a JSON object resource (``key`` is the full name)."""
    return ObjectMeta(
        key=str(resource["name"]),
        size=int(resource.get("size", 0)),
        version=str(resource["generation"]) if resource.get("generation") is not None else None,
        last_modified=parse_time(resource.get("updated") or resource.get("timeCreated")),
        metadata=dict(resource.get("metadata") or {}),
    )


def meta_from_blob(blob: gcs.Blob) -> ObjectMeta:
    return ObjectMeta(
        key=str(blob.name),
        size=int(blob.size or 0),
        version=str(blob.generation) if blob.generation is not None else None,
        last_modified=blob.updated or blob.time_created,
        metadata=dict(blob.metadata or {}),
    )


def raise_for_status(response: requests.Response) -> None:
    """Turn an HTTP error of a raw request into the google.api_core exception the library raises."""
    if response.status_code >= 400:
        raise api_exceptions.from_http_response(response)  # type: ignore[no-untyped-call]


class StreamedBody:
    """A request body sent piece by piece from the caller's buffers.

    Why: joining metadata + payload into one ``bytes`` would copy every byte once more
    (64 MiB per in-flight write at the default threshold). requests sends an iterable
    with a known ``len`` as a plain Content-Length body; iterating again restarts it,
    so a re-send (google-auth retries once after refreshing a rejected token) is whole.
    """

    def __init__(self, pieces: Sequence[memoryview]) -> None:
        self._pieces = [p for p in pieces if p.nbytes]
        self._length = sum(p.nbytes for p in self._pieces)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[memoryview]:
        return iter(self._pieces)

