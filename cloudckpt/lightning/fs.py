"""A minimal fsspec file system over cloudckpt's ``Storage``, for the file calls Lightning makes.

Why: Lightning's ``ModelCheckpoint`` and its ``ckpt_path`` handling ask fsspec about the
checkpoint directory (``exists``, ``ls``, ``isdir``, ``modified``, ``makedirs``, ``rm``, ``open``
for ``best_k_models.yaml``) and fail at construction for ``s3://`` without s3fs. The plugin
already reaches the bucket through cloudckpt's storage (same endpoint, credentials, retries),
so this view answers those calls with the same storage rather than requiring a second S3
client. It is registered only for protocols that no installed fsspec package serves: with
s3fs or gcsfs installed, Lightning uses them, unchanged.

Keys are objects; a "directory" is a prefix that has objects under it (``makedirs`` does
nothing, as on any object store). Reads and writes are whole objects.
"""

from __future__ import annotations

import io
import threading
from datetime import datetime
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from cloudckpt.errors import NotFoundError
from cloudckpt.storage import ObjectMeta, Storage, open_storage

#: Protocols the view can serve (cloudckpt's cloud backends).
PROTOCOLS = ("s3", "gs", "gcs")


class CloudFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """fsspec's file-system verbs Lightning uses, on a cloudckpt ``Storage`` per bucket
    (one subclass per protocol: fsspec hands it paths without their protocol)."""

    protocol: tuple[str, ...] = PROTOCOLS
    root_marker = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buckets: dict[str, Storage] = {}
        self._lock = threading.Lock()

    def _split(self, path: str) -> tuple[Storage, str]:
        """``(storage of the bucket, key)`` of ``path`` (with or without its protocol)."""
        scheme = path.split("://", 1)[0] if "://" in path else self.protocol[0]
        bucket, _, key = self._strip_protocol(path).partition("/")
        url = f"{scheme}://{bucket}"
        with self._lock:
            storage = self._buckets.get(url)
            if storage is None:
                storage = self._buckets[url] = open_storage(url)
        return storage, key.strip("/")

    @staticmethod
    def _file(bucket: str, meta: ObjectMeta) -> dict[str, Any]:
        return {"name": f"{bucket}/{meta.key}", "size": meta.size, "type": "file", "LastModified": meta.last_modified}

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        storage, key = self._split(path)
        bucket = self._strip_protocol(path).partition("/")[0]
        prefix = f"{key}/" if key else ""
        out: dict[str, dict[str, Any]] = {}
        for meta in storage.list(prefix):
            child, slash, _ = meta.key[len(prefix):].partition("/")
            name = f"{bucket}/{prefix}{child}"
            out.setdefault(name, {"name": name, "size": 0, "type": "directory"} if slash else self._file(bucket, meta))
        if not out:
            info = self.info(path)
            if info["type"] == "file":
                return [info] if detail else [info["name"]]
        entries = [out[n] for n in sorted(out)]
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        storage, key = self._split(path)
        bucket = self._strip_protocol(path).partition("/")[0]
        if key:
            try:
                return self._file(bucket, storage.head(key))
            except NotFoundError:
                pass
        if not key or storage.list(f"{key}/")[:1]:
            return {"name": f"{bucket}/{key}".rstrip("/"), "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def modified(self, path: str) -> datetime:
        stamp = self.info(path).get("LastModified")
        if stamp is None:
            raise FileNotFoundError(f"{path} is a directory or has no modification time")
        return stamp  # type: ignore[no-any-return]

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Nothing to do: an object store has no directories."""

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Nothing to do: an object store has no directories."""

    def rm_file(self, path: str) -> None:
        storage, key = self._split(path)
        storage.delete(key)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        for one in [path] if isinstance(path, str) else path:
            storage, key = self._split(one)
            keys = [key] + ([m.key for m in storage.list(f"{key}/")] if recursive else [])
            storage.delete(keys)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> io.BytesIO:
        storage, key = self._split(path)
        if "r" in mode:
            return io.BytesIO(storage.get(key))
        return _Upload(storage, key)


class _Upload(io.BytesIO):
    """A file open for writing: one PUT of the whole object on close."""

    def __init__(self, storage: Storage, key: str) -> None:
        super().__init__()
        self._storage, self._key = storage, key

    def close(self) -> None:
        if not self.closed:
            self._storage.put(self._key, self.getvalue())
        super().close()


def register_fallbacks() -> None:
    """Serve each of ``PROTOCOLS`` that no installed fsspec package serves (s3fs, gcsfs win)."""
    for protocol in PROTOCOLS:
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError:
            view = type(f"CloudFileSystem_{protocol}", (CloudFileSystem,), {"protocol": (protocol,)})
            fsspec.register_implementation(protocol, view, clobber=True)
