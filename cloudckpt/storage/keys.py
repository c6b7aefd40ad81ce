"""Storage keys and local-path errors: what every backend validates and translates the same way."""

from __future__ import annotations

import os

from cloudckpt.errors import InvalidKeyError, NotFoundError, PermissionDeniedError, StorageError

#: Spread data objects live under ``<name>.d/<2 hex>/`` (``format.data_key(spread=True)``); the
#: local backend knows the form only to remove such a directory once its last object is gone.
SPREAD_INFIX = ".d/"


def translate_os_error(exc: BaseException, url: str) -> BaseException:
    """The cloudckpt error for an ``OSError`` from a file-system-like backend (local, fsspec).

    A path through a regular file (``run/model.py/ckpt``) is "not found" for a reader too,
    but the message says which component is a file, not a directory.
    """
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, NotADirectoryError):
        blocker = file_in_the_way(exc.filename) if isinstance(exc.filename, str) else None
        why = f"{blocker} is a file, not a directory" if blocker else "a component of the path is not a directory"
        return NotFoundError(f"{url} not found: {why}", url)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError)):
        return NotFoundError(f"{url} not found", url)
    if isinstance(exc, PermissionError):
        return PermissionDeniedError(f"permission denied on {url}: {exc.strerror}", url)
    if isinstance(exc, OSError):
        return StorageError(f"I/O error on {url}: {exc.strerror or exc}", url)
    return exc


def file_in_the_way(path: str | os.PathLike[str]) -> str | None:
    """The first component of ``path`` that exists and is not a directory (a file in the way)."""
    current = os.path.abspath(os.fspath(path))
    chain = []
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for candidate in reversed(chain):  # from the root down
        if os.path.lexists(candidate) and not os.path.isdir(candidate):
            return candidate
    return None


def validate_key(key: str, url: str) -> str:
    """Refuse keys that could escape the storage root or mean nothing on every store."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"storage key must be a str, got {type(key).__name__} for {url}", url)
    if not key:
        raise InvalidKeyError(f"empty storage key for {url}", url)
    if key.startswith("/"):
        raise InvalidKeyError(f"storage key {key!r} must be relative (no leading '/') at {url}", url)
    if "\x00" in key or "\\" in key:
        raise InvalidKeyError(f"storage key {key!r} contains a NUL or backslash at {url}", url)
    parts = key.split("/")
    if any(part in ("..", ".") for part in parts):
        raise InvalidKeyError(f"storage key {key!r} has a '.' or '..' segment at {url}", url)
    if any(part == "" for part in parts[:-1]):
        raise InvalidKeyError(f"storage key {key!r} has an empty path segment at {url}", url)
    return key
