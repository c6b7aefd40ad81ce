"""``open_storage``: the backend a URL names, rooted at it (backends import lazily).

Why a module of its own: ``storage/registry.py`` opens storages on demand and the package's
front door re-exports both, so the factory sits below them and neither imports the package.
"""

from __future__ import annotations

import os
from typing import Any

from cloudckpt.errors import MissingDependencyError
from cloudckpt.storage.base import Storage
from cloudckpt.storage.extras import missing_extra
from cloudckpt.storage.urls import url_scheme


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
