"""Per-process caches: one SDK client per configuration, one answer per capability probe.

Why: a client owns an HTTP connection pool and (for real credentials) a token that
refreshes itself; building one per storage object would redo the auth handshake and
defeat connection reuse. A capability probe (does this bucket honour conditional writes?)
costs requests; its answer holds for the process. A forked child must not use its
parent's sockets, nor a lock another thread held at fork time, so each cache empties
itself - locks included - in the child.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("cloudckpt.storage")


class ProcessLocalCache(Generic[K, V]):
    """A thread-safe ``key -> value`` cache whose entries (and locks) never cross a fork.

    Values are built outside the cache-wide lock, under a lock of their own key: threads
    asking for the same key wait for one build, threads asking for other keys do not wait
    at all. A build that raises is not remembered, so the next caller tries again.
    """

    def __init__(self) -> None:
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[K, V] = {}
        self._building: dict[K, threading.Lock] = {}
        self._pid = os.getpid()

    def _key_lock(self, key: K) -> threading.Lock:
        with self._lock:
            if self._pid != os.getpid():  # forked without the at-fork hook (e.g. os.fork in C code)
                self._items.clear()
                self._building.clear()
                self._pid = os.getpid()
            return self._building.setdefault(key, threading.Lock())

    def peek(self, key: K) -> V | None:
        """The cached value, or ``None`` if it was not built yet in this process."""
        with self._lock:
            return self._items.get(key) if self._pid == os.getpid() else None

    def get(self, key: K, build: Callable[[], V]) -> V:
        """The cached value for ``key``, built by ``build()`` on first use in this process."""
        value = self.peek(key)
        if value is not None:
            return value
        with self._key_lock(key):
            value = self.peek(key)
            if value is None:
                value = build()
                with self._lock:
                    self._items[key] = value
            return value

    def warm(self, key: K, build: Callable[[], V], name: str = "cloudckpt-probe") -> None:
        """Start building ``key`` on a background thread unless it is cached or being built.

        A later ``get`` waits for that build instead of running its own. The thread is not
        a daemon: interpreter exit waits for it (a probe is a few small requests, each
        bounded by the retry policy; a client build sends none), so it cannot be killed
        halfway and leave a scratch object behind.
        """
        if self.peek(key) is not None or self._key_lock(key).locked():
            return

        def run() -> None:
            try:
                self.get(key, build)
            except Exception as exc:  # the foreground caller will run it again and see the error
                log.debug("background build of %s failed: %s", key, exc)

        threading.Thread(target=run, name=name).start()

    def set(self, key: K, value: V) -> None:
        """Record ``value`` for ``key`` (tests: pretend a probe gave this answer)."""
        with self._lock:
            self._items[key] = value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: (backend, endpoint, bucket, capability) -> what a capability probe found, once per process.
CAPABILITIES: ProcessLocalCache[tuple[str, ...], Any] = ProcessLocalCache()
#: (backend, endpoint, bucket) -> ``True`` once the bucket was seen to exist in this process.
BUCKETS_SEEN: ProcessLocalCache[tuple[str, ...], bool] = ProcessLocalCache()
