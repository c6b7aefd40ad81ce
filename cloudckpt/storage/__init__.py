"""Storage backends behind one interface, chosen by URL.

``open_storage("s3://bucket/prefix")`` -> S3 via boto3; ``gs://`` -> GCS via
google-cloud-storage; a plain path or ``file://`` -> local disk; any other protocol
fsspec knows (``memory://``, ``az://``, ...) -> the fsspec backend. Backends are
imported lazily so ``import cloudckpt`` does not pull in boto3 or google-cloud-storage.
"""

from __future__ import annotations

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
from cloudckpt.storage.factory import open_storage
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
from cloudckpt.storage.urls import check_url, join_url, split_url, url_scheme

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
    "check_url",
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
