"""Google Cloud Storage backend (``gs://bucket/prefix``) on google-cloud-storage.

How each verb maps onto GCS, and why:

- **Small writes** (``put`` up to ``multipart_threshold``) are one *simple* upload
  (``uploadType=multipart``: JSON metadata + bytes in one ``multipart/related``
  request), whatever the size. google-cloud-storage switches to a resumable upload
  above 8 MiB, and fake-gcs-server silently drops ``ifGenerationMatch`` on resumable
  uploads, so a create-if-absent or compare-and-swap write must never take that path.
  The request is sent through the client's authorized session (the library's only
  way to force a simple upload is a private method whose signature changed between
  2.x and 3.x), streamed from the caller's buffers without joining them.
- **Large writes** are a *parallel composite upload*: each part becomes a temporary
  object under ``<root>/.cloudckpt-tmp/<upload id>/`` whose name ends in
  ``.cloudckpt-tmp`` (so a bucket lifecycle rule with ``matches_suffix`` expires
  whatever a SIGKILL left behind), uploaded concurrently by the base class's pool;
  ``compose`` then concatenates them into the final key (a tree of compose calls when
  there are more than 32), and every temporary object is deleted - on failure too.
  GCS has no minimum part size for compose (S3's 5 MiB minimum does not apply).
  fake-gcs-server has no XML multipart API, which is why compose and not
  ``transfer_manager.upload_chunks_concurrently``.
- **Conditional writes**: ``create`` is ``ifGenerationMatch=0``, ``UpdateVersion(g)``
  is ``ifGenerationMatch=g`` - on the simple upload and on the final compose. Some
  servers (fake-gcs-server 1.54, measured) ignore preconditions on compose, copy and
  rewrite; a one-time probe per bucket detects that, and a conditional write above
  the threshold then goes up as one simple upload (correct, not parallel).
- **Integrity**: the CRC32C of every upload is sent (``crc32c`` in the object
  resource, base64 of the big-endian value) so GCS rejects corrupted bytes; the value
  the server reports back is compared too, because fake-gcs-server does not verify it.
  A composite object has no MD5, only a CRC32C; the backend checks it against the
  CRC32C combined from the parts' values (no extra pass over the data).
- **Reads** are ranged GETs of ``alt=media`` through the authorized session, read
  straight into the destination buffer in slices.
- **Retries**: every library call gets ``retry=None`` and the raw requests have none,
  so the base class's ``_call`` is the one retry layer.
- **Deletes** go one request per key: fake-gcs-server has no batch endpoint.

Capabilities: conditional writes yes; server-side CRC32C yes; listing is a plain
string prefix (temporary objects are hidden unless the listed prefix is inside
``TEMP_PREFIX``, which is how cleanup tooling finds them).

Modules: this one is the data plane (``GCSStorage``: reads, simple uploads, deletes, listing);
``gcs_client`` builds the clients and reads object metadata, ``gcs_errors`` says what GCS's
answers mean, ``gcs_compose`` is the parallel composite upload.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import quote

from cloudckpt.storage.extras import missing_extra

try:
    import google.cloud.storage as gcs
    import requests
    from google.api_core import exceptions as api_exceptions
    from google.auth.credentials import Credentials
except ImportError as _missing:  # google-cloud-storage is the install extra cloudckpt[gcs]
    raise missing_extra("gcs", _missing) from _missing

from cloudckpt.errors import (
    ChecksumError,
    InvalidRangeError,
    InvalidURLError,
    StorageError,
)
from cloudckpt.storage.base import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    ByteRange,
    MultipartUpload,
    ObjectMeta,
    Storage,
    TransferConfig,
    WriteMode,
    crc32c_base64,
)
from cloudckpt.storage.gcs_client import (
    CLIENTS,
    TIMEOUT,
    StreamedBody,
    build_client,
    meta_from_blob,
    meta_from_resource,
    raise_for_status,
)
from cloudckpt.storage.gcs_client import EMULATOR_PROJECT as EMULATOR_PROJECT
from cloudckpt.storage.gcs_compose import MAX_COMPOSE_SOURCES as MAX_COMPOSE_SOURCES
from cloudckpt.storage.gcs_compose import PART_OF_KEY as PART_OF_KEY
from cloudckpt.storage.gcs_compose import CompositeUpload
from cloudckpt.storage.gcs_errors import generation_match, is_throttle, is_transient, precondition_error, translate
from cloudckpt.storage.transfer import body_crc32c, direct_reader, fill_from
from cloudckpt.storage.urls import parse_bucket_url

log = logging.getLogger("cloudckpt.storage")


class GCSStorage(Storage):
    """``gs://bucket/prefix`` on Google Cloud Storage (or fake-gcs-server).

    Args:
        url: ``gs://bucket`` or ``gs://bucket/prefix`` (``gcs://`` is accepted too).
        client: a ready ``google.cloud.storage.Client``; used as-is (a forked child
            must build its own). Without it, one shared client per process is built
            from ``project`` / ``credentials``: anonymous credentials and a dummy
            project when ``STORAGE_EMULATOR_HOST`` is set, else google-auth's default
            chain. Concurrency above 10 wants a client whose session has a larger
            connection pool (requests' default is 10 per host).
        project: billing/owner project; inferred from the environment when omitted.
        credentials: google-auth credentials (they refresh themselves).
        config: part sizes, concurrency, bandwidth cap and retry policy.
        kms_key_name: Cloud KMS key that encrypts the objects written (CMEK).
        storage_class: storage class of the objects written (e.g. ``"NEARLINE"``);
            temporary parts are always ``STANDARD``, which has no minimum storage
            duration to pay for when they are deleted a moment later.
        user_project: project billed for requests to a requester-pays bucket.
    """

    schemes: ClassVar[tuple[str, ...]] = ("gs", "gcs")
    partitions_by_prefix: ClassVar[bool] = True  # GCS ramps request rates per key range (hashed names spread them)

    def __init__(self, url: str, *, client: gcs.Client | None = None, project: str | None = None,
                 credentials: Credentials | None = None, config: TransferConfig | None = None,
                 kms_key_name: str | None = None, storage_class: str | None = None,
                 user_project: str | None = None) -> None:
        parsed = parse_bucket_url(url)
        if parsed.scheme not in self.schemes:
            raise InvalidURLError(f"{url!r} is not a gs:// URL", url)
        super().__init__(parsed.root("gs"), config)
        self.bucket_name = parsed.bucket
        self._key_prefix = parsed.prefix
        self._given_client = client
        self._project = project
        self._credentials = credentials
        self.kms_key_name = kms_key_name
        self.storage_class = storage_class
        self.user_project = user_project

    # ------------------------------------------------------------------ plumbing
    @property
    def _prefix(self) -> str:
        return self._key_prefix

    @property
    def client(self) -> gcs.Client:
        """The client in use: the one given, or this process's shared one."""
        if self._given_client is not None:
            return self._given_client
        emulator = os.environ.get("STORAGE_EMULATOR_HOST") or None
        project, credentials = self._project, self._credentials
        return CLIENTS.get((emulator, project, credentials),
                            lambda: build_client(project, credentials, emulator))

    def _store_identity(self) -> tuple[str, ...]:
        return ("gcs", self._endpoint(), self.bucket_name)

    def _bucket(self) -> gcs.Bucket:
        return self.client.bucket(self.bucket_name, user_project=self.user_project)

    def _blob(self, full_key: str) -> gcs.Blob:
        return self._bucket().blob(full_key, kms_key_name=self.kms_key_name)

    def _endpoint(self) -> str:
        client = self.client
        endpoint = getattr(client, "api_endpoint", None) or client._connection.API_BASE_URL
        return str(endpoint).rstrip("/")

    def _session(self) -> requests.Session:
        """The client's authorized session (it adds and refreshes the OAuth token)."""
        session: requests.Session = self.client._http
        return session

    def _query(self, **extra: Any) -> dict[str, str]:
        params = {k: str(v) for k, v in extra.items() if v is not None}
        if self.user_project is not None:
            params["userProject"] = self.user_project
        return params

    def _temp_name(self, upload_id: str, part: str) -> str:
        return f"{self._prefix}{TEMP_PREFIX}{upload_id}/{part}{TEMP_SUFFIX}"

    # ------------------------------------------------------------------ reads
    def _head(self, full_key: str) -> ObjectMeta:
        blob = self._blob(full_key)
        blob.reload(projection="noAcl", timeout=TIMEOUT, retry=None)
        return meta_from_blob(blob)

    def _media_url(self, full_key: str) -> str:
        return (f"{self._endpoint()}/download/storage/v1/b/{quote(self.bucket_name, safe='')}"
                f"/o/{quote(full_key, safe='')}")

    def _media_get(self, full_key: str, range_header: str | None) -> requests.Response:
        headers = {"Accept-Encoding": "identity"}  # no transcoding: ranges count stored bytes
        if range_header is not None:
            headers["Range"] = range_header
        response = self._session().get(self._media_url(full_key), params=self._query(alt="media"),
                                       headers=headers, stream=True, timeout=TIMEOUT)
        if response.status_code >= 400:
            try:
                response.content  # noqa: B018 - the error body, for the message
            finally:
                response.close()
            raise_for_status(response)
        return response

    def _get_range(self, full_key: str, byte_range: ByteRange | None) -> bytes:
        if byte_range is not None and byte_range.suffix_length == 0:
            self._head(full_key)  # "bytes=-0" is unsatisfiable; still fail for a missing key
            return b""
        header = byte_range.http_header() if byte_range is not None else None
        # A 200 (whole object) answers a range only if that range covers the whole object.
        whole_ok = byte_range is None or byte_range.suffix_length is not None or byte_range == ByteRange(0)
        with self._media_get(full_key, header) as response:
            if response.status_code != 206 and not whole_ok:
                where = self._url_for_full(full_key)
                raise StorageError(f"server ignored Range {header} for {where}", where)
            return response.content

    def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
        url = self._url_for_full(full_key)
        size = sum(out.nbytes for out in outs)
        header = ByteRange.bounded(offset, offset + size).http_header()
        with self._media_get(full_key, header) as response:
            if response.status_code != 206:
                raise StorageError(f"server ignored Range {header} for {url}", url)
            readinto, done = direct_reader(response.raw)
            filled = fill_from(readinto, outs)
            done()
        if filled != size:
            raise InvalidRangeError(
                f"range {header} of {url} runs past the end of the object "
                f"(got {filled} of {size} bytes)", url)

    def _list(self, full_prefix: str) -> Iterator[ObjectMeta]:
        temp_root = self._prefix + TEMP_PREFIX
        show_temp = full_prefix.startswith(temp_root)
        blobs = self.client.list_blobs(self._bucket(), prefix=full_prefix or None, projection="noAcl",
                                       timeout=TIMEOUT, retry=None)
        for blob in blobs:
            if not show_temp and str(blob.name).startswith(temp_root):
                continue  # a composite upload in flight (or abandoned) is not an object
            yield meta_from_blob(blob)

    # ------------------------------------------------------------------ writes
    def _upload(self, full_key: str, buffers: Sequence[memoryview], *, generation_match: int | None,
                metadata: Mapping[str, str] | None, storage_class: str | None) -> ObjectMeta:
        """One simple (non-resumable) upload; returns the new object's metadata.

        Raises the SDK's ``PreconditionFailed`` on 412 (callers map it by mode) and
        ``ChecksumError`` when the server stored other bytes than were sent.
        """
        crc = crc32c_base64(body_crc32c(buffers))
        resource: dict[str, Any] = {"name": full_key, "contentType": "application/octet-stream",
                                    "crc32c": crc}
        if metadata:
            resource["metadata"] = dict(metadata)
        if storage_class is not None:
            resource["storageClass"] = storage_class
        boundary = f"cloudckpt-{uuid.uuid4().hex}"
        head = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{json.dumps(resource)}\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        # requests' stubs do not know that an iterable of buffers with a len() is a body.
        body: Any = StreamedBody([memoryview(head), *buffers, memoryview(tail)])
        url = f"{self._endpoint()}/upload/storage/v1/b/{quote(self.bucket_name, safe='')}/o"
        params = self._query(uploadType="multipart", ifGenerationMatch=generation_match,
                             kmsKeyName=self.kms_key_name)
        response = self._session().post(
            url, params=params, data=body, timeout=TIMEOUT,
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'})
        raise_for_status(response)
        stored = response.json()
        if stored.get("crc32c") not in (None, crc):
            where = self._url_for_full(full_key)
            raise ChecksumError(f"{where}: server stored CRC32C {stored['crc32c']}, sent {crc}; "
                                "the bytes were corrupted in transit")
        return meta_from_resource(stored)

    def _put_whole(self, full_key: str, buffers: Sequence[memoryview], mode: WriteMode,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        try:
            return self._upload(full_key, buffers, generation_match=generation_match(mode),
                                metadata=metadata, storage_class=self.storage_class)
        except api_exceptions.PreconditionFailed as exc:
            raise precondition_error(mode, self._url_for_full(full_key)) from exc

    def _begin_multipart(self, full_key: str, mode: WriteMode, metadata: Mapping[str, str],
                         size: int, part_size: int) -> MultipartUpload:
        return CompositeUpload(self, full_key, mode, metadata)

    def _multipart_honours(self, mode: WriteMode, url: str) -> bool:
        """Whether compose enforces ``ifGenerationMatch`` here (probed once per bucket and process).

        fake-gcs-server 1.54 ignores it; then a conditional write above the threshold goes
        up as one simple upload (base class), the one path with an enforced precondition.
        """
        return self._capability("compose preconditions", self._probe_compose_preconditions, url)

    def _probe_compose_preconditions(self) -> bool:
        """Compose a scratch temporary object onto itself with ``ifGenerationMatch=0``.

        GCS answers 412; a server that ignores the condition (fake-gcs-server) succeeds.
        """
        probe = self._temp_name(uuid.uuid4().hex, "compose-precondition-probe")
        self._upload(probe, [memoryview(b"")], generation_match=None, metadata=None,
                     storage_class="STANDARD")
        try:
            blob = self._blob(probe)
            blob.compose([blob], if_generation_match=0, timeout=TIMEOUT, retry=None)
            honoured = False
        except api_exceptions.PreconditionFailed:
            honoured = True
        finally:
            self._delete_quietly([probe])
        if not honoured:
            log.warning("gs://%s: compose ignores ifGenerationMatch (an emulator?); conditional writes "
                        "above the multipart threshold go up as one simple upload", self.bucket_name)
        return honoured

    # ------------------------------------------------------------------ deletes
    def _delete_many(self, full_keys: Sequence[str]) -> None:
        for full_key in full_keys:
            try:
                self._blob(full_key).delete(timeout=TIMEOUT, retry=None)
            except api_exceptions.NotFound:
                if self._bucket_missing():  # a missing key is fine, a missing bucket is not
                    raise

    def _delete_quietly(self, full_keys: Sequence[str]) -> None:
        """Best-effort cleanup of temporary objects: log, never raise (lifecycle rules expire leftovers)."""
        try:
            self._delete_many(full_keys)
        except Exception as exc:
            log.warning("could not delete %d temporary objects in gs://%s: %s",
                        len(full_keys), self.bucket_name, exc)

    # ------------------------------------------------------------------ errors
    def _is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def _is_throttle(self, exc: BaseException) -> bool:
        return is_throttle(exc)

    def _translate(self, exc: BaseException, url: str) -> BaseException:
        return translate(exc, url, self.bucket_name, self._bucket_missing)

    def _bucket_exists(self) -> bool | None:
        """A bucket GET: GCS and fake-gcs-server answer a missing object and a missing bucket alike (404)."""
        response = self._session().get(
            f"{self._endpoint()}/storage/v1/b/{quote(self.bucket_name, safe='')}",
            params=self._query(fields="name"), timeout=TIMEOUT)
        response.close()
        if response.status_code == 404:
            return False
        return True if response.status_code < 400 else None

    def _url_for_full(self, full_key: str) -> str:
        return self.url_for(full_key[len(self._prefix):])

    # ------------------------------------------------------------------ clock
    def server_time(self) -> datetime:
        """GCS's clock: the ``Date`` header of a bucket GET (any status carries one)."""
        def probe() -> datetime:
            response = self._session().get(
                f"{self._endpoint()}/storage/v1/b/{quote(self.bucket_name, safe='')}",
                params=self._query(fields="name"), timeout=TIMEOUT)
            response.close()
            date = response.headers.get("Date")
            if not date:
                raise_for_status(response)
                raise StorageError(f"no Date header from GCS for {self.url}", self.url)
            return parsedate_to_datetime(date)

        return self._call(probe, self.url, describe="server time of")
