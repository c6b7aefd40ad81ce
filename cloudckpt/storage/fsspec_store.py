"""Any fsspec file system (``memory://``, ``az://``, ``hdfs://``, ...) as a cloudckpt store.

What this backend lacks, by design rather than by accident:

- **Conditional writes**: fsspec has no portable create-if-absent or compare-and-swap, so
  ``mode="create"`` and ``UpdateVersion`` raise ``NotSupportedError`` instead of
  pretending (a check-then-write would race). Checkpoints still commit, with plain
  overwrites: nothing fences a second writer. Use ``s3://``, ``gs://`` or local paths
  for that guarantee.
- **Parallel multipart upload**: every object is one ``pipe_file`` call.
- **User metadata**: not stored (``ObjectMeta.metadata`` is empty).

Listing caches are switched off: a checkpoint reader must see the index a writer just
committed, not a cached listing from before it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, ClassVar

import fsspec

from cloudckpt.errors import (
    InvalidRangeError,
    InvalidURLError,
    NotSupportedError,
)
from cloudckpt.storage.base import (
    ByteRange,
    MultipartUpload,
    ObjectMeta,
    Storage,
    TransferConfig,
    WriteMode,
    translate_os_error,
)


class FsspecStorage(Storage):
    """A prefix of an fsspec file system, addressed as ``protocol://path``."""

    schemes: ClassVar[tuple[str, ...]] = ()
    supports_conditional_writes = False
    supports_multipart = False

    def __init__(self, url: str, *, config: TransferConfig | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 fs: fsspec.AbstractFileSystem | None = None) -> None:
        protocol, _, path = url.partition("://")
        if not protocol or not _:
            raise InvalidURLError(f"not a protocol://path URL: {url!r}", url)
        try:
            self.fs = fs or fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True,
                                              **dict(storage_options or {}))
        except (ValueError, ImportError) as exc:
            raise InvalidURLError(f"no storage backend for {url!r}: {exc}", url) from exc
        self._root = path.rstrip("/")
        super().__init__(url, config)

    @property
    def _prefix(self) -> str:
        return f"{self._root}/" if self._root else ""

    def _require_conditional(self, url: str) -> None:
        raise NotSupportedError(
            f"{url}: fsspec stores cannot create-if-absent or compare-and-swap atomically; "
            "use s3://, gs:// or a local path for conditional writes", url)

    def _head(self, full_key: str) -> ObjectMeta:
        info = self.fs.info(full_key)
        if info.get("type") != "file":
            raise FileNotFoundError(full_key)
        return _meta(full_key, info)

    def _get_range(self, full_key: str, byte_range: ByteRange | None) -> bytes:
        if byte_range is None:
            return bytes(self.fs.cat_file(full_key))
        if byte_range.suffix_length is not None:
            size = int(self.fs.info(full_key)["size"])
            return bytes(self.fs.cat_file(full_key, start=max(size - byte_range.suffix_length, 0), end=size))
        start = byte_range.start or 0
        size = int(self.fs.info(full_key)["size"])
        if start > size:
            raise InvalidRangeError(f"range {byte_range.http_header()} starts past the end of "
                                    f"{self._url_of_full(full_key)} ({size} bytes)", self._url_of_full(full_key))
        return bytes(self.fs.cat_file(full_key, start=start, end=byte_range.end))

    def _put_whole(self, full_key: str, buffers: Sequence[memoryview], mode: WriteMode,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        data = buffers[0].tobytes() if len(buffers) == 1 else b"".join(buffers)
        self.fs.pipe_file(full_key, data)
        return self._head(full_key)

    def _begin_multipart(self, full_key: str, mode: WriteMode, metadata: Mapping[str, str],
                         size: int, part_size: int) -> MultipartUpload:
        raise NotSupportedError(f"{self._url_of_full(full_key)}: fsspec backend has no multipart upload",
                                self._url_of_full(full_key))

    def _delete_many(self, full_keys: Sequence[str]) -> None:
        for key in full_keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(key)

    def _list(self, full_prefix: str) -> Iterator[ObjectMeta]:
        directory = full_prefix.rpartition("/")[0] if "/" in full_prefix else ""
        try:
            found = self.fs.find(directory or self._root or "/", detail=True)
        except FileNotFoundError:
            return
        for name, info in found.items():
            key = name.lstrip("/") if not full_prefix.startswith("/") else name
            if key.startswith(full_prefix) and info.get("type") == "file":
                yield _meta(key, info)

    def _is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, (TimeoutError, ConnectionError))

    def _translate(self, exc: BaseException, url: str) -> BaseException:
        return translate_os_error(exc, url)


def _meta(key: str, info: Mapping[str, Any]) -> ObjectMeta:
    stamp = info.get("mtime") or info.get("created") or info.get("LastModified")
    modified: datetime | None
    if isinstance(stamp, datetime):
        modified = stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    elif isinstance(stamp, (int, float)):
        modified = datetime.fromtimestamp(stamp, timezone.utc)
    else:
        modified = None
    version = info.get("ETag") or info.get("etag") or info.get("generation")
    return ObjectMeta(key=key, size=int(info["size"]), version=str(version) if version else None,
                      last_modified=modified)
