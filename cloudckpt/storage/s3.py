"""S3 (and S3-compatible stores) through boto3: ``s3://bucket/prefix``.

What this backend adds to the shared machinery in ``base``:

* **One client per process**, cached by endpoint/region/pool size, rebuilt in a forked
  child (a boto3 client's connection pool must not be shared across ``fork``). The client
  resolves credentials through the normal boto3 chain and keeps refreshable credentials
  refreshable; endpoint and region come from ``AWS_ENDPOINT_URL(_S3)``, ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION`` and the config files unless given in code.
* **One retry layer**: botocore's own retries are off (``total_max_attempts=1``); the
  base class retries what ``_is_transient`` accepts.
* **Integrity**: every PUT and every part carries the CRC32C computed while the bytes
  pass (``ChecksumCRC32C``); stores that check it (AWS, SeaweedFS) reject damaged bytes.
  moto accepts and ignores it.
* **Conditional writes**: ``create`` -> ``If-None-Match: *``, ``UpdateVersion(etag)`` ->
  ``If-Match``, on ``PutObject`` and on ``CompleteMultipartUpload``. A store that silently
  ignores them is detected by a probe (once per bucket and process) and conditional modes
  are refused with ``NotSupportedError``. A store that honours them on PUT but not on
  ``CompleteMultipartUpload`` (moto ignores ``If-Match`` there) gets conditional writes of
  any size as one PUT (S3 allows up to 5 GiB in one PUT), so they stay atomic.

Where stores differ, and what callers see:

* ``UpdateVersion`` on a missing key: AWS and moto answer 404, SeaweedFS 412; both come
  out as ``PreconditionError`` ("not at that version").
* A missing bucket: GET/LIST say ``NoSuchBucket``, but HEAD has no error body (bare 404)
  and SeaweedFS answers PUT with 403 ``AccessDenied``; a ``HeadBucket`` on those error
  paths tells ``BucketNotFoundError`` from ``NotFoundError`` / ``PermissionDeniedError``.
* ETags are content hashes: writing the same bytes again keeps the version, so
  ``UpdateVersion`` cannot see an A -> B -> A change of the object (ABA). Objects that are
  compare-and-swapped (the manager's state file) carry a writer token and timestamps.
* moto reports a fixed 2010 ``Initiated`` time for multipart uploads.

Modules: this one is the data plane (``S3Storage``: reads, writes, deletes, listing, and the
multipart upload itself); ``s3_client`` builds the clients, ``s3_errors`` says what S3's
answers mean and translates them (this module's ``_diagnose`` asks the bucket why a bare
403/404 happened), ``s3_probes`` asks a store which conditional writes it honours, and
``s3_multipart`` lists and aborts the uploads a store still holds, ``s3_body`` streams request
bodies from the caller's buffers (GET bodies are read straight into them). Why this one is still
~450 lines: what is left is one class's data plane on one client - each verb with the S3 quirk
it works around, written next to it - and this docstring, the reference for how S3-compatible
stores differ.
"""

from __future__ import annotations

import contextlib
import email.utils
import importlib.util
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, ClassVar

from cloudckpt.storage.extras import missing_extra

# The SDK is imported here, though the s3_* modules use most of it: importing this backend
# is where a missing extra must say so, whichever module is already loaded. botocore, not
# boto3: clients are built on a botocore session (``s3_client`` says why), and importing
# boto3 (with s3transfer) cost a process's first request ~0.1 s; it is only looked up, as the
# package the extra installs (and users configure).
try:
    if importlib.util.find_spec("boto3") is None:  # installed, not imported: cloudckpt[s3] is boto3
        raise ModuleNotFoundError("No module named 'boto3'", name="boto3")
    import botocore.config  # noqa: F401
    import botocore.exceptions as bce
    import urllib3.exceptions  # noqa: F401
except ImportError as _missing:  # boto3 is the install extra cloudckpt[s3]
    raise missing_extra("s3", _missing) from _missing

from cloudckpt.errors import (
    InvalidRangeError,
    InvalidURLError,
    NotSupportedError,
    StorageError,
)
from cloudckpt.storage.base import (
    ByteRange,
    GiB,
    MiB,
    MultipartUpload,
    ObjectMeta,
    Storage,
    TransferConfig,
    UpdateVersion,
    WriteMode,
    crc32c_base64,
)
from cloudckpt.storage.clients import BUCKETS_SEEN
from cloudckpt.storage.s3_body import SMALL_BODY as SMALL_BODY
from cloudckpt.storage.s3_body import BufferReader
from cloudckpt.storage.s3_body import body as _body
from cloudckpt.storage.s3_client import shared_client, warm_client
from cloudckpt.storage.s3_errors import delete_error, error_info, is_throttle, is_transient, refusal, translate
from cloudckpt.storage.s3_multipart import PendingUpload as PendingUpload
from cloudckpt.storage.s3_multipart import abort_upload, list_uploads
from cloudckpt.storage.s3_probes import MultipartConditions, probe_multipart_conditions, probe_put_conditions
from cloudckpt.storage.transfer import body_crc32c, direct_reader, fill_from
from cloudckpt.storage.urls import parse_bucket_url

log = logging.getLogger("cloudckpt.storage")

# The names tests call, kept from before the split; assigned (not import aliases) so that
# mypy sees them as this module's own.
_BufferReader = BufferReader
_delete_error = delete_error

#: S3 limits: one PUT, one part (min / max), parts per upload, keys per DeleteObjects.
MAX_PUT_SIZE = 5 * GiB
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
DELETE_BATCH = 1000


# ---------------------------------------------------------------------- small helpers
def _crc32c_b64(buffers: Sequence[memoryview]) -> str:
    """S3's ``ChecksumCRC32C``: base64 of the big-endian 4-byte CRC32C."""
    return crc32c_base64(body_crc32c(buffers))


def _etag(response: Mapping[str, Any]) -> str | None:
    etag = response.get("ETag")
    return etag.strip('"') if isinstance(etag, str) else None


def _condition(mode: WriteMode) -> dict[str, str]:
    """The request parameters that make a write conditional."""
    if mode == "create":
        return {"IfNoneMatch": "*"}
    if isinstance(mode, UpdateVersion):
        return {"IfMatch": f'"{mode.version}"'}
    return {}


# ---------------------------------------------------------------------- the backend
class S3Storage(Storage):
    """A prefix of an S3 bucket (or of an S3-compatible store such as SeaweedFS or MinIO).

    Args:
        url: ``s3://bucket/prefix`` (``s3a://`` accepted too).
        client: a ready boto3 S3 client. It is used as is - configure it like ours
            (retries off, ``request_checksum_calculation="when_required"``) and do not
            share it across ``fork``. Default: the process-wide client built here.
        endpoint_url: overrides ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
        region_name: overrides ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile.
        config: part size, concurrency, retries, bandwidth cap. The multipart threshold is
            clamped to 5 GiB (S3's single-PUT limit).
        sse_kms_key_id: encrypt new objects with this KMS key (SSE-KMS).
        storage_class: e.g. ``"STANDARD_IA"`` for new objects.
        requester_pays: send ``x-amz-request-payer: requester`` on every request.
        check_conditional_writes: probe once per bucket that the store honours
            ``If-None-Match`` / ``If-Match`` before the first conditional write. Turn off
            only for a store known to honour them (saves two requests per process).
    """

    schemes: ClassVar[tuple[str, ...]] = ("s3", "s3a")
    max_put_size: ClassVar[int | None] = MAX_PUT_SIZE
    partitions_by_prefix: ClassVar[bool] = True  # ~3,500 PUT/s and 5,500 GET/s per prefix, then 503 SlowDown

    def __init__(self, url: str, *, client: Any = None, endpoint_url: str | None = None,
                 region_name: str | None = None, config: TransferConfig | None = None,
                 sse_kms_key_id: str | None = None, storage_class: str | None = None,
                 requester_pays: bool = False, check_conditional_writes: bool = True) -> None:
        parsed = parse_bucket_url(url)
        if parsed.scheme not in self.schemes:
            raise InvalidURLError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)", url)
        self.bucket, self._key_prefix = parsed.bucket, parsed.prefix
        config = config or TransferConfig()
        if config.multipart_threshold > MAX_PUT_SIZE:
            config = replace(config, multipart_threshold=MAX_PUT_SIZE)
        super().__init__(parsed.root(), config)
        self._scheme = parsed.scheme
        self._own_client = client
        self._endpoint_url = endpoint_url
        self._region_name = region_name
        self._check_conditional = check_conditional_writes
        self._payer: dict[str, str] = {"RequestPayer": "requester"} if requester_pays else {}
        self._write_params: dict[str, str] = {}  # what new objects carry (``_loc`` adds the payer)
        if sse_kms_key_id:
            self._write_params.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=sse_kms_key_id)
        if storage_class:
            self._write_params["StorageClass"] = storage_class
        self._client: Any = None
        self._client_pid = -1
        if client is None:  # build it while the caller gets ready for its first request (issue 27)
            warm_client(endpoint_url, region_name, self._pool_size())

    # ------------------------------------------------------------------ plumbing
    @property
    def _prefix(self) -> str:
        return self._key_prefix

    @property
    def client(self) -> Any:
        """The boto3 client in use (this process's shared one unless one was given)."""
        if self._own_client is not None:
            return self._own_client
        if self._client is None or self._client_pid != os.getpid():
            self._client = shared_client(self._endpoint_url, self._region_name, self._pool_size())
            self._client_pid = os.getpid()
        return self._client

    def _pool_size(self) -> int:
        return max(10, 2 * self.config.max_concurrency)

    def _store_identity(self) -> tuple[str, ...]:
        return ("s3", str(self.client.meta.endpoint_url), self.bucket)

    def _url_of(self, full_key: str) -> str:
        return f"{self._scheme}://{self.bucket}/{full_key}"

    def _loc(self, full_key: str) -> dict[str, Any]:
        """Bucket, key and requester-pays: what every object request carries."""
        return {"Bucket": self.bucket, "Key": full_key, **self._payer}

    # ------------------------------------------------------------------ reads
    def _head(self, full_key: str) -> ObjectMeta:
        """Metadata of one object, from a GET of its first byte rather than a HEAD.

        Why: a HEAD answer has no body, so a 404 cannot say whether the key or the bucket
        is missing, and a 403 cannot name its cause (``SignatureDoesNotMatch``); telling
        them apart took a second request - on the first save to a new directory, before
        any data moved. A one-byte GET costs the same request and its errors carry their
        code. An empty object has no first byte (416), and an archived one cannot be read
        (``InvalidObjectState``): those rare cases ask HEAD.
        """
        try:
            response = self.client.get_object(Range="bytes=0-0", **self._loc(full_key))
        except bce.ClientError as exc:
            code, status = error_info(exc)
            if status != 416 and code != "InvalidObjectState":
                raise
            response = self.client.head_object(**self._loc(full_key))
            size = int(response["ContentLength"])
        else:
            with contextlib.closing(response["Body"]) as body:
                total = str(response.get("ContentRange") or "").rpartition("/")[2]
                if total.isdigit():
                    body.read()  # the one byte: the connection goes back to the pool
                    size = int(total)
                else:  # the store ignored the range: closing drops the connection, not a GiB read
                    size = int(response["ContentLength"])
        self._saw_bucket()
        return ObjectMeta(key=full_key, size=size, version=_etag(response),
                          last_modified=response.get("LastModified"),
                          metadata=dict(response.get("Metadata") or {}))

    def _get_range(self, full_key: str, byte_range: ByteRange | None) -> bytes:
        if byte_range is not None and byte_range.suffix_length == 0:
            self._head(full_key)  # S3 refuses "bytes=-0"; the answer is b"" if the key exists
            return b""
        params = self._loc(full_key)
        if byte_range is not None:
            params["Range"] = byte_range.http_header()
        try:
            response = self.client.get_object(**params)
        except bce.ClientError as exc:
            if byte_range is not None and error_info(exc)[1] == 416 and self._range_at_end(full_key, byte_range):
                return b""
            raise
        with contextlib.closing(response["Body"]) as body:
            data: bytes = body.read()
        return data

    def _range_at_end(self, full_key: str, byte_range: ByteRange) -> bool:
        """Whether a refused (416) range is an empty one at the object's end.

        S3 refuses any range of an empty object and ``bytes=<size>-``; the other backends
        answer those with ``b""``, so this one does too (checked only on the error path).
        """
        size = self._head(full_key).size
        if byte_range.suffix_length is not None:
            return size == 0
        return byte_range.start == size

    def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
        size = sum(out.nbytes for out in outs)
        end = offset + size
        response = self.client.get_object(Range=f"bytes={offset}-{end - 1}", **self._loc(full_key))
        with contextlib.closing(response["Body"]) as body:
            short = int(response.get("ContentLength", size)) < size
            readinto, done = direct_reader(getattr(body, "_raw_stream", body))  # botocore streams via urllib3
            filled = 0 if short else fill_from(readinto, outs)
            done()
        if filled < size:
            url = self._url_of(full_key)
            raise InvalidRangeError(f"{url} ends before byte {end}: the requested range "
                                    f"[{offset}, {end}) runs past the end of the object", url)

    def _list(self, full_prefix: str) -> Iterator[ObjectMeta]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix, **self._payer):
            for obj in page.get("Contents", ()):
                yield ObjectMeta(key=obj["Key"], size=int(obj["Size"]), version=_etag(obj),
                                 last_modified=obj.get("LastModified"))

    # ------------------------------------------------------------------ writes
    def _put_whole(self, full_key: str, buffers: Sequence[memoryview], mode: WriteMode,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        size = sum(b.nbytes for b in buffers)
        with self._conditional_errors(full_key, mode):
            response = self.client.put_object(
                Body=_body(buffers, size), ContentLength=size, ChecksumCRC32C=_crc32c_b64(buffers),
                Metadata=dict(metadata), **_condition(mode), **self._write_params, **self._loc(full_key))
        return ObjectMeta(key=full_key, size=size, version=_etag(response), metadata=dict(metadata))

    def _begin_multipart(self, full_key: str, mode: WriteMode, metadata: Mapping[str, str],
                         size: int, part_size: int) -> MultipartUpload:
        # Declaring CRC32C here is what lets each part carry its own ChecksumCRC32C (AWS
        # rejects part checksums of a type the upload was not created with).
        response = self.client.create_multipart_upload(
            Metadata=dict(metadata), ChecksumAlgorithm="CRC32C", **self._write_params, **self._loc(full_key))
        self._saw_bucket()
        return _S3Multipart(self, full_key, str(response["UploadId"]), mode, metadata, size, part_size)

    def _part_size(self, size: int) -> int:
        """At least the configured size, 5 MiB, and 1/10,000 of the object; at most 5 GiB."""
        return min(max(self.config.part_size, math.ceil(size / MAX_PARTS), MIN_PART_SIZE), MAX_PART_SIZE)

    @contextlib.contextmanager
    def _conditional_errors(self, full_key: str, mode: WriteMode) -> Iterator[None]:
        """Translate a refused conditional write here, where the mode is still known."""
        try:
            yield
        except bce.ClientError as exc:
            refused = refusal(exc, self._url_of(full_key), mode)
            if refused is None:
                raise
            try:
                raise refused from exc
            finally:
                del refused  # kept in this frame's locals, it would close a cycle through its own traceback

    def _delete_many(self, full_keys: Sequence[str]) -> None:
        if len(full_keys) == 1:
            self.client.delete_object(**self._loc(full_keys[0]))
            return
        for start in range(0, len(full_keys), DELETE_BATCH):
            batch = full_keys[start:start + DELETE_BATCH]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}, **self._payer)
            errors = [e for e in response.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise _delete_error(errors)

    # ------------------------------------------------------------------ conditional probes
    def _require_conditional(self, url: str) -> None:
        """Refuse conditional modes on a store that ignores ``If-None-Match`` (probed once)."""
        if not self._check_conditional:
            return
        honoured = self._capability("conditional PUT", lambda: probe_put_conditions(self), url)
        if not honoured:
            raise NotSupportedError(
                f"{self._scheme}://{self.bucket} ignores conditional writes (If-None-Match): a "
                f"'create' or UpdateVersion write to {url} could silently overwrite another writer; "
                f"use a store that honours them (AWS S3, SeaweedFS, MinIO >= 2024) or mode='overwrite'", url)

    def _warm_up_conditional(self) -> None:
        if self._check_conditional:
            self._warm_capability("conditional PUT", lambda: probe_put_conditions(self))

    def _multipart_honours(self, mode: WriteMode, url: str) -> bool:
        if not self._check_conditional:
            return True
        found: MultipartConditions = self._capability("conditional multipart",
                                                      lambda: probe_multipart_conditions(self), url)
        return found.if_none_match if mode == "create" else found.if_match

    # ------------------------------------------------------------------ cleanup tooling
    def list_multipart_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Incomplete multipart uploads under ``prefix`` (keys relative to the root).

        A SIGKILLed writer never aborts its upload; its parts cost storage until aborted.
        Compare ``initiated`` with ``server_time()``, not with the local clock.
        """
        return list_uploads(self, prefix)

    def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        """Abort an incomplete multipart upload of ``key``; an unknown upload id is fine."""
        full = self._full(key)
        self._call(lambda: abort_upload(self, full, upload_id), self.url_for(key),
                   describe="abort multipart upload of")

    def server_time(self) -> datetime:
        """The store's clock: the ``Date`` header of a ``HeadBucket`` (error answers carry it too)."""
        def fetch() -> str | None:
            try:
                headers = self.client.head_bucket(Bucket=self.bucket)["ResponseMetadata"]["HTTPHeaders"]
            except bce.ClientError as exc:
                headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            date = headers.get("date")
            return str(date) if date else None

        date = self._call(fetch, self.url, describe="HEAD bucket")
        if date is None:
            log.warning("%s sent no Date header; using the local clock", self.url)
            return datetime.now(timezone.utc)
        return email.utils.parsedate_to_datetime(date).astimezone(timezone.utc)

    # ------------------------------------------------------------------ errors
    def _is_transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    def _is_throttle(self, exc: BaseException) -> bool:
        return is_throttle(exc)

    def _translate(self, exc: BaseException, url: str) -> BaseException:
        return translate(exc, url, self.bucket, self._diagnose)

    def _diagnose(self, always: bool = False) -> tuple[str, str] | None:
        """``(code, message)`` of a one-key LIST of the bucket, to explain a bare 403/404.

        ``None`` when the LIST succeeds, or (unless ``always``) when the bucket was seen in
        this process: then the original answer stands (the object is missing, or this
        request is not allowed). Costs one request, on error paths only.
        """
        if not always and BUCKETS_SEEN.peek(self._store_identity()):
            return None
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1, **self._payer)
        except bce.ClientError as exc:
            code, _ = error_info(exc)
            return code, str(exc.response.get("Error", {}).get("Message") or code)
        except Exception as exc:
            log.debug("could not diagnose an error of %s: %s", self.url, exc)
            return None
        self._saw_bucket()
        return None

    def _bucket_exists(self) -> bool | None:
        cause = self._diagnose()
        if cause is None:
            return True
        return False if cause[0] == "NoSuchBucket" else None


class _S3Multipart(MultipartUpload):
    """One S3 multipart upload: parts go up concurrently, each with its CRC32C."""

    def __init__(self, storage: S3Storage, full_key: str, upload_id: str, mode: WriteMode,
                 metadata: Mapping[str, str], size: int, part_size: int) -> None:
        self._storage = storage
        self._key = full_key
        self._upload_id = upload_id
        self._mode = mode
        self._metadata = dict(metadata)
        self._size = size
        self._parts: list[dict[str, Any] | None] = [None] * math.ceil(size / part_size)

    def upload_part(self, index: int, pieces: Sequence[memoryview]) -> None:
        size = sum(p.nbytes for p in pieces)
        checksum = _crc32c_b64(pieces)
        response = self._storage.client.upload_part(
            Body=_body(pieces, size), ContentLength=size, ChecksumCRC32C=checksum,
            PartNumber=index + 1, UploadId=self._upload_id, **self._storage._loc(self._key))
        self._parts[index] = {"PartNumber": index + 1, "ETag": response["ETag"], "ChecksumCRC32C": checksum}

    def complete(self) -> ObjectMeta:
        parts = [p for p in self._parts if p is not None]
        if len(parts) != len(self._parts):
            raise StorageError(f"internal error: completing {self._storage._url_of(self._key)} "
                               f"with {len(parts)} of {len(self._parts)} parts")
        with self._storage._conditional_errors(self._key, self._mode):
            response = self._storage.client.complete_multipart_upload(
                UploadId=self._upload_id, MultipartUpload={"Parts": parts}, **_condition(self._mode),
                **self._storage._loc(self._key))
        return ObjectMeta(key=self._key, size=self._size, version=_etag(response), metadata=self._metadata)

    def abort(self) -> None:
        url = self._storage._url_of(self._key)
        self._storage._call(lambda: abort_upload(self._storage, self._key, self._upload_id), url,
                            describe="abort multipart upload of")
