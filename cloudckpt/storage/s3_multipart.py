"""S3 multipart administration: the uploads a store still holds, and aborting one.

A SIGKILLed writer never aborts its upload; cleanup tooling lists them (``PendingUpload``)
and aborts them. ``S3Storage.list_multipart_uploads`` / ``abort_multipart_upload`` are the
public face; the upload itself (``_S3Multipart``) is part of the data plane in ``s3``.
Split out of ``s3`` (issue 23).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

from cloudckpt.storage.extras import missing_extra

try:
    import botocore.exceptions as bce
except ImportError as _missing:  # boto3 is the install extra cloudckpt[s3]
    raise missing_extra("s3", _missing) from _missing

from cloudckpt.storage.s3_errors import error_info

if TYPE_CHECKING:
    from cloudckpt.storage.s3 import S3Storage

log = logging.getLogger("cloudckpt.storage")


class PendingUpload(NamedTuple):
    """An incomplete multipart upload, as the store reports it (for cleanup tooling)."""

    key: str
    upload_id: str
    initiated: datetime


def list_uploads(storage: S3Storage, prefix: str = "") -> list[PendingUpload]:
    """Incomplete multipart uploads under ``prefix`` (keys relative to the root).

    A SIGKILLed writer never aborts its upload; its parts cost storage until aborted.
    Compare ``initiated`` with ``server_time()``, not with the local clock.
    """
    full_prefix = storage._prefix + prefix

    def fetch() -> list[PendingUpload]:
        paginator = storage.client.get_paginator("list_multipart_uploads")
        return [PendingUpload(u["Key"][len(storage._prefix):], u["UploadId"], u["Initiated"])
                for page in paginator.paginate(Bucket=storage.bucket, Prefix=full_prefix, **storage._payer)
                for u in page.get("Uploads", ())]

    return storage._call(fetch, storage.url_for(prefix), describe="LIST multipart uploads of")


def abort_upload(storage: S3Storage, full_key: str, upload_id: str) -> None:
    """Abort one multipart upload; one already gone (aborted, completed) is fine."""
    try:
        storage.client.abort_multipart_upload(UploadId=upload_id, **storage._loc(full_key))
    except bce.ClientError as exc:
        if error_info(exc)[0] != "NoSuchUpload":
            raise


def quiet_abort(storage: S3Storage, full_key: str, upload_id: str) -> None:
    """Abort, logging instead of raising (a leftover upload is cleanup tooling's to find)."""
    try:
        abort_upload(storage, full_key, upload_id)
    except Exception as exc:
        log.warning("could not abort multipart upload %s of %s: %s", upload_id, storage._url_of(full_key), exc)
