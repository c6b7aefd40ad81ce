"""Storage backends behind one interface, chosen by URL.

``open_storage("s3://bucket/prefix")`` -> S3 via boto3; ``gs://`` -> GCS via
google-cloud-storage; a plain path or ``file://`` -> local disk; any other protocol
fsspec knows (``memory://``, ``az://``, ...) -> the fsspec backend. Backends are
imported lazily so ``import cloudckpt`` does not pull in boto3 or google-cloud-storage.
"""

from __future__ import annotations

import os
from typing import Any

from cloudckpt.errors import InvalidURLError
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
from cloudckpt.storage.retry import RetryPolicy

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
    "join_url",
    "open_storage",
    "split_url",
    "url_scheme",
]


def url_scheme(url: str | os.PathLike[str]) -> str:
    """``"s3"``, ``"gs"``, ``"file"`` (for plain paths too), or another fsspec protocol."""
    text = os.fspath(url)
    if "://" not in text:
        return "file"
    return text.split("://", 1)[0].lower()


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


def join_url(directory: str | os.PathLike[str], name: str) -> str:
    """``directory`` + ``/`` + ``name``, for URLs and local paths alike."""
    text = os.fspath(directory)
    if "://" in text:
        return f"{text.rstrip('/')}/{name}"
    return os.path.join(text, name)


def split_url(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a checkpoint path into (directory URL, last component).

    ``"s3://b/run/ckpt-7"`` -> ``("s3://b/run", "ckpt-7")``; ``"ckpt-7"`` -> ``(".", "ckpt-7")``.
    A checkpoint is a prefix, so its objects are ``<name>.index`` etc. in that directory.
    """
    text = os.fspath(path).rstrip("/")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if "/" not in rest:
            raise InvalidURLError(f"{text!r} names a bucket, not a checkpoint path inside it", text)
        parent, name = rest.rsplit("/", 1)
        return f"{scheme}://{parent}", name
    parent, name = os.path.split(text)
    if not name:
        raise InvalidURLError(f"{text!r} does not name a checkpoint", text)
    return parent or ".", name
