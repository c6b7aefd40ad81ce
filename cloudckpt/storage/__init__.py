"""Storage backends behind one interface, chosen by URL.

``open_storage("s3://bucket/prefix")`` -> S3 via boto3; ``gs://`` -> GCS via
google-cloud-storage; a plain path or ``file://`` -> local disk; any other protocol
fsspec knows (``memory://``, ``az://``, ...) -> the fsspec backend. Backends are
imported lazily so ``import cloudckpt`` does not pull in boto3 or google-cloud-storage.
"""

from __future__ import annotations

import os
from typing import Any

from cloudckpt.errors import MissingDependencyError
from cloudckpt.storage.base import (
    ByteRange,
    MultipartUpload,
    ObjectMeta,
    ReadRequest,
    Storage,
    TransferConfig,
    UpdateVersion,
    WriteMode,
)
from cloudckpt.storage.extras import missing_extra
from cloudckpt.storage.retry import RetryPolicy
from cloudckpt.storage.urls import check_url, join_url, split_url, url_scheme

__all__ = [
    "ByteRange",
    "MultipartUpload",
    "ObjectMeta",
    "ReadRequest",
    "RetryPolicy",
    "Storage",
    "TransferConfig",
    "UpdateVersion",
    "WriteMode",
    "check_url",
    "join_url",
    "open_storage",
    "split_url",
    "url_scheme",
]


def open_storage(url: str | os.PathLike[str], **options: Any) -> Storage:
    """The storage backend for ``url``, rooted at it.

    ``options`` go to the backend's constructor (e.g. ``client=``, ``config=``,
    ``sse_kms_key_id=`` for S3); each backend documents its own and rejects unknown ones.

    Raises:
        InvalidURLError: unknown scheme, a cloud URL without a bucket, or a typo such as
            ``s3:/bucket`` (one slash) that would otherwise become a local directory.
        MissingDependencyError: the URL needs an SDK whose install extra is missing
            (``pip install 'cloudckpt[s3]'`` / ``'cloudckpt[gcs]'``).
    """
    text = os.fspath(url)
    scheme = url_scheme(text)
    if scheme == "file":
        from cloudckpt.storage.local import LocalStorage
        return LocalStorage(text, **options)
    try:
        if scheme in ("s3", "s3a"):
            from cloudckpt.storage.s3 import S3Storage
            return S3Storage(text, **options)
        if scheme in ("gs", "gcs"):
            from cloudckpt.storage.gcs import GCSStorage
            return GCSStorage(text, **options)
    except MissingDependencyError as exc:
        cause = exc.__cause__
        if not isinstance(cause, ImportError):
            raise
        raise missing_extra("s3" if scheme.startswith("s3") else "gcs", cause, text) from cause
    from cloudckpt.storage.fsspec_store import FsspecStorage
    return FsspecStorage(text, **options)
