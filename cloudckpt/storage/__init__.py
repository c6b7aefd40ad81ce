"""Storage backends behind one interface, chosen by URL.

``open_storage("s3://bucket/prefix")`` -> S3 via boto3; ``gs://`` -> GCS via
google-cloud-storage; a plain path or ``file://`` -> local disk; any other protocol
fsspec knows (``memory://``, ``az://``, ...) -> the fsspec backend. Backends are
imported lazily so ``import cloudckpt`` does not pull in boto3 or google-cloud-storage.
"""

from __future__ import annotations

import os
from typing import Any

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
from cloudckpt.storage.registry import (
    CheckpointPath,
    Directory,
    Location,
    register_storage,
    resolve,
    resolve_directory,
    storage_for_directory,
    unregister_storage,
)
from cloudckpt.storage.retry import RetryPolicy
from cloudckpt.storage.urls import join_url, split_url, url_scheme

__all__ = [
    "ByteRange",
    "CheckpointPath",
    "Directory",
    "Location",
    "MultipartUpload",
    "ObjectMeta",
    "ReadRequest",
    "RetryPolicy",
    "Storage",
    "TransferConfig",
    "UpdateVersion",
    "WriteMode",
    "join_url",
    "open_storage",
    "register_storage",
    "resolve",
    "resolve_directory",
    "split_url",
    "storage_for_directory",
    "unregister_storage",
    "url_scheme",
]


def open_storage(url: str | os.PathLike[str], **options: Any) -> Storage:
    """The storage backend for ``url``, rooted at it.

    ``options`` go to the backend's constructor (e.g. ``client=``, ``config=``,
    ``sse_kms_key_id=`` for S3); each backend documents its own and rejects unknown ones.

    Raises:
        InvalidURLError: unknown scheme, or a cloud URL without a bucket.
    """
    text = os.fspath(url)
    scheme = url_scheme(text)
    if scheme == "file":
        from cloudckpt.storage.local import LocalStorage
        return LocalStorage(text, **options)
    if scheme in ("s3", "s3a"):
        from cloudckpt.storage.s3 import S3Storage
        return S3Storage(text, **options)
    if scheme in ("gs", "gcs"):
        from cloudckpt.storage.gcs import GCSStorage
        return GCSStorage(text, **options)
    from cloudckpt.storage.fsspec_store import FsspecStorage
    return FsspecStorage(text, **options)
