"""Capability probes of an S3-compatible store: does it honour ``If-None-Match`` / ``If-Match``
on ``PutObject``, and on ``CompleteMultipartUpload``?

Each probe writes a scratch object under ``PROBE_PREFIX`` (expired by the lifecycle rule if
a crash leaves it) and deletes it before its answer is remembered. ``S3Storage`` asks once
per bucket and process, through the base class's capability cache. Split out of ``s3``
(issue 23).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cloudckpt.storage.extras import missing_extra

try:
    import botocore.exceptions as bce
except ImportError as _missing:  # boto3 is the install extra cloudckpt[s3]
    raise missing_extra("s3", _missing) from _missing

from cloudckpt.storage.s3_errors import error_info
from cloudckpt.storage.s3_multipart import quiet_abort
from cloudckpt.storage.values import PROBE_PREFIX, TEMP_SUFFIX

if TYPE_CHECKING:
    from cloudckpt.storage.s3 import S3Storage

log = logging.getLogger("cloudckpt.storage")


@dataclass(frozen=True, slots=True)
class MultipartConditions:
    """Which conditions ``CompleteMultipartUpload`` enforces on this store."""

    if_none_match: bool
    if_match: bool


def probe_key(storage: S3Storage) -> str:
    return f"{storage._prefix}{PROBE_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"


def probe_put_conditions(storage: S3Storage) -> bool:
    """Write a scratch key, then create it again with If-None-Match: expect 412."""
    key = probe_key(storage)
    storage.client.put_object(Body=b"probe", **storage._loc(key))
    try:
        storage.client.put_object(Body=b"probe", IfNoneMatch="*", **storage._loc(key))
        return False
    except bce.ClientError as exc:
        if error_info(exc)[1] in (409, 412):
            return True
        raise
    finally:  # before the answer is remembered: a save that relied on it leaves no scratch object
        quiet_delete(storage, key)


def probe_multipart_conditions(storage: S3Storage) -> MultipartConditions:
    """Complete two one-part uploads onto an existing scratch key: each must get 412."""
    key = probe_key(storage)
    storage.client.put_object(Body=b"probe", **storage._loc(key))
    try:
        return MultipartConditions(
            if_none_match=probe_completion(storage, key, {"IfNoneMatch": "*"}),
            if_match=probe_completion(storage, key, {"IfMatch": f'"{"0" * 32}"'}))
    finally:
        quiet_delete(storage, key)


def probe_completion(storage: S3Storage, key: str, condition: dict[str, str]) -> bool:
    upload_id = storage.client.create_multipart_upload(**storage._loc(key))["UploadId"]
    try:
        part = storage.client.upload_part(Body=b"probe", PartNumber=1, UploadId=upload_id, **storage._loc(key))
        storage.client.complete_multipart_upload(
            UploadId=upload_id, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
            **condition, **storage._loc(key))
        return False
    except bce.ClientError as exc:
        if error_info(exc)[1] in (409, 412):
            return True
        raise
    finally:
        quiet_abort(storage, key, upload_id)


def quiet_delete(storage: S3Storage, full_key: str) -> None:
    try:
        storage.client.delete_object(**storage._loc(full_key))
    except Exception as exc:  # a leftover under TEMP_PREFIX is expired by the lifecycle rule
        log.warning("could not delete probe object %s: %s", storage._url_of(full_key), exc)
