"""Resolving what a user passes (a path, a URL, a ``Storage``) into storage objects, once.

The public API takes paths and URLs because that is what TensorFlow users write; every
layer below it takes objects. This module is the one place where text becomes objects:
``resolve`` turns a checkpoint path into a :class:`Location` (the storage of its
directory + the checkpoint's name in it), ``resolve_directory`` turns a directory into
its ``Storage``. Nothing below the public API parses a URL again.

Why a per-directory registry: a training job saves to the same directory every few
minutes; building an SDK client and a thread pool each time would cost more than a small
save. ``register_storage`` is how code says what environment variables cannot (a custom
client, credentials or endpoint given in code, transfer tuning, a fault-injecting test
store): a registered storage is used for every path directly under its URL and is never
evicted; storages opened on demand are kept in a small LRU cache.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Union

from cloudckpt.storage.base import Storage
from cloudckpt.storage.factory import open_storage
from cloudckpt.storage.urls import check_url, split_url

#: Storages opened on demand that stay open (their pools and clients) for reuse.
CACHE_SIZE = 16

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True, slots=True)
class Location:
    """A checkpoint resolved once: the storage of its directory and its name there.

    ``Location(storage, "ckpt-7")`` names the objects ``ckpt-7.index`` and
    ``ckpt-7.data-*`` in ``storage``. Every public function that takes a checkpoint path
    also takes a ``Location``, so code that opened its own ``Storage`` (custom client,
    credentials, transfer tuning) passes it down explicitly instead of registering it.
    """

    storage: Storage
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.storage, Storage):
            raise TypeError(f"Location.storage must be a cloudckpt Storage, got {type(self.storage).__name__}")
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"Location.name must be a checkpoint name without '/', got {self.name!r}")

    @property
    def url(self) -> str:
        """The checkpoint's full URL (for messages and return values)."""
        return self.storage.url_for(self.name)

    def sibling(self, name: str) -> Location:
        """Another checkpoint in the same directory."""
        return Location(self.storage, name)

    def __str__(self) -> str:
        return self.url


CheckpointPath = Union[str, "os.PathLike[str]", Location]
Directory = Union[str, "os.PathLike[str]", Storage]

_registered: dict[str, Storage] = {}
_opened: OrderedDict[str, Storage] = OrderedDict()
_lock = threading.Lock()


def _directory_key(directory: PathLike) -> str:
    """The registry key of a directory: its URL, or a local path made absolute.

    The URL parser runs first: made absolute, a typo such as ``s3:/bucket/run`` would look
    like an ordinary local path (``/cwd/s3:/bucket/run``) to every check after this one.
    """
    text = check_url(directory)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(text)


def storage_for_directory(directory: PathLike) -> Storage:
    """The storage rooted at ``directory``: the registered one, else one opened and cached.

    Every entry point that takes a directory (``CheckpointManager``, ``latest_checkpoint``,
    the CLI) comes through here, so all of them refuse the same URL typos.

    Raises:
        InvalidURLError: the text is not a usable URL or path (unknown scheme, no bucket,
            ``s3:/x`` missing a slash).
        MissingDependencyError: the URL needs an SDK extra that is not installed.
    """
    key = _directory_key(directory)
    with _lock:
        registered = _registered.get(key)
        if registered is not None:
            return registered
        storage = _opened.get(key)
        if storage is None:
            storage = open_storage(key)
            _opened[key] = storage
            while len(_opened) > CACHE_SIZE:
                _opened.popitem(last=False)[1].close()
        else:
            _opened.move_to_end(key)
        return storage


def register_storage(storage: Storage) -> None:
    """Use ``storage`` for every checkpoint directly under its URL (until unregistered)."""
    if not isinstance(storage, Storage):
        raise TypeError(f"register_storage expects a cloudckpt Storage, got {type(storage).__name__}")
    key = _directory_key(storage.url)
    with _lock:
        _registered[key] = storage
        _opened.pop(key, None)


def unregister_storage(storage: Storage) -> None:
    """Stop using ``storage`` for its URL (later calls open a storage of their own)."""
    key = _directory_key(storage.url)
    with _lock:
        if _registered.get(key) is storage:
            del _registered[key]


def is_registered(storage: Storage) -> bool:
    """Whether ``storage`` is the one ``register_storage`` made its URL's: built in code (a
    client, credentials or tuning its URL does not carry), so another process cannot open it again."""
    with _lock:
        return _registered.get(_directory_key(storage.url)) is storage


def resolve(path: CheckpointPath) -> Location:
    """The ``Location`` of a checkpoint path or URL (a ``Location`` is returned as is).

    ``"s3://b/run/ckpt-7"`` -> ``Location(<S3Storage s3://b/run>, "ckpt-7")``.
    """
    if isinstance(path, Location):
        return path
    directory, name = split_url(path)
    return Location(storage_for_directory(directory), name)


def resolve_directory(directory: Directory) -> Storage:
    """The ``Storage`` of a checkpoint directory given as a path, a URL or a ``Storage``."""
    if isinstance(directory, Storage):
        return directory
    return storage_for_directory(directory)
