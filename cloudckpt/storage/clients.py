"""One SDK client per process and configuration, shared by every storage object.

Why: a client owns an HTTP connection pool and (for real credentials) a token that
refreshes itself; building one per storage object would redo the auth handshake and
defeat connection reuse. A forked child must not use its parent's sockets, nor a lock
another thread held at fork time, so the cache empties itself in the child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ProcessLocalCache(Generic[K, V]):
    """A thread-safe ``key -> value`` cache whose entries never cross a fork."""

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[K, V] = {}
        self._pid = os.getpid()

    def get(self, key: K, build: Callable[[], V]) -> V:
        """The cached value for ``key``, built by ``build()`` on first use in this process."""
        with self._lock:
            if self._pid != os.getpid():  # forked without the at-fork hook (e.g. os.fork in C code)
                self._items.clear()
                self._pid = os.getpid()
            value = self._items.get(key)
            if value is None:
                value = build()
                self._items[key] = value
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
