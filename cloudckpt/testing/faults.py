"""Fault injection for the storage contract: what a test asks for, and one way to do it everywhere.

A contract test says *what* goes wrong in terms every backend shares - "the next two
``put`` requests of ``obj`` fail transiently", "the ``commit`` of ``once`` lands but its
answer is lost" - and each backend's test module says *how*: S3 through an HTTP proxy in
front of a real server, GCS through a transport adapter under google-cloud-storage, and
stores without a network (local disk, fsspec) through ``PrimitiveFaults``, which wraps
the backend's primitives. Keys are relative to the store's root, as callers write them.

Verbs (what one request does):

* ``put`` - a whole object in one request; ``part`` - one part of a multipart write;
  ``complete`` - the request that makes a multipart write visible; ``commit`` - either
  of ``put`` / ``complete`` (whichever makes the object visible: a conditional write
  above the threshold may go up as one request on stores that ignore conditions there).
* ``get`` (whole or ranged reads), ``head``, ``list`` (the key is the listed prefix),
  ``delete``.

Kinds: ``fail`` (a transient failure before the request reaches the store: a 500, a
reset), ``throttle`` (the store asks to slow down: 503 SlowDown, 429), ``lose_answer``
(the store carries the request out, the client never hears back: the trap of conditional
writes), ``deny`` (a permanent permission error).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeVar

from cloudckpt.storage import ByteRange, MultipartUpload, ObjectMeta, Storage, WriteMode

T = TypeVar("T")
Verb = Literal["put", "part", "complete", "commit", "get", "head", "list", "delete"]
Kind = Literal["fail", "throttle", "lose_answer", "deny"]

#: What each verb matches among the concrete request kinds an injector sees.
_MATCHES: Mapping[str, frozenset[str]] = {
    "commit": frozenset({"put", "complete"}),
}


def verb_matches(asked: str, seen: str) -> bool:
    """Whether a rule for verb ``asked`` applies to a request of kind ``seen``."""
    return seen == asked or seen in _MATCHES.get(asked, frozenset())


@dataclass
class FaultRule:
    """Apply ``kind`` to the next ``times`` requests of ``verb`` on ``key``."""

    kind: Kind
    verb: Verb
    key: str
    times: int = 1

    def matches(self, verb: str, key: str) -> bool:
        return self.times > 0 and self.key == key and verb_matches(self.verb, verb)


class Faults:
    """Faults injected into the requests of one store under test; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._seen: list[tuple[str, str]] = []

    # ---------------------------------------------------------------- what tests call
    def fail(self, verb: Verb, key: str, times: int = 1) -> FaultRule:
        """The next ``times`` requests fail transiently, before the store sees them."""
        return self._add(FaultRule("fail", verb, key, times))

    def throttle(self, verb: Verb, key: str, times: int = 1) -> FaultRule:
        """The next ``times`` requests are answered "slow down" (stores that throttle only)."""
        return self._add(FaultRule("throttle", verb, key, times))

    def lose_answer(self, verb: Verb, key: str, times: int = 1) -> FaultRule:
        """The next ``times`` requests are carried out, and their answers lost."""
        return self._add(FaultRule("lose_answer", verb, key, times))

    def deny(self, verb: Verb, key: str, times: int = 1) -> FaultRule:
        """The next ``times`` requests are refused: permission denied (not retried)."""
        return self._add(FaultRule("deny", verb, key, times))

    def attempts(self, verb: Verb, key: str) -> int:
        """Requests of ``verb`` on ``key`` the injector saw, faulted ones included."""
        with self._lock:
            return sum(1 for seen_verb, seen_key in self._seen if seen_key == key and verb_matches(verb, seen_verb))

    def pending(self) -> int:
        """How many injected faults have not fired yet (0: every fault happened)."""
        with self._lock:
            return sum(rule.times for rule in self._rules)

    def skew_clock(self, delta: timedelta) -> bool:
        """Shift the store's clock as its answers show it; ``False`` if the store's clock is this machine's."""
        return False

    # ---------------------------------------------------------------- what injectors call
    def decide(self, verb: str, key: str) -> Kind | None:
        """Record one request of kind ``verb`` on ``key``; the fault to apply to it, if any."""
        with self._lock:
            self._seen.append((verb, key))
            for rule in self._rules:
                if rule.matches(verb, key):
                    rule.times -= 1
                    return rule.kind
            return None

    def _add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._rules.append(rule)
        return rule


class PrimitiveFaults(Faults):
    """Faults for stores without a network: the backend's primitives are wrapped on the instance.

    ``transient`` builds the exception the backend classifies as transient (local disk:
    ``OSError(EAGAIN)``; fsspec: ``ConnectionResetError``); ``denied`` a permission error.
    """

    def __init__(self, store: Storage, transient: Callable[[], BaseException],
                 denied: Callable[[], BaseException] = lambda: PermissionError(13, "injected: permission denied")
                 ) -> None:
        super().__init__()
        self._store = store
        self._transient = transient
        self._denied = denied
        self._wrap()

    def _key(self, full_key: str) -> str:
        prefix = self._store._prefix
        return full_key[len(prefix):] if full_key.startswith(prefix) else full_key

    def _around(self, verb: str, key: str, call: Callable[[], T]) -> T:
        kind = self.decide(verb, key)
        if kind in ("fail", "throttle"):  # no network, no throttling: a throttle is one more transient failure
            raise self._transient()
        if kind == "deny":
            raise self._denied()
        result = call()
        if kind == "lose_answer":
            raise self._transient()
        return result

    def _wrap(self) -> None:
        store = self._store
        put_whole, head, get_range, read_into = store._put_whole, store._head, store._get_range, store._read_into
        list_, delete_many, begin = store._list, store._delete_many, store._begin_multipart

        def _put_whole(full_key: str, buffers: Sequence[memoryview], mode: WriteMode,
                       metadata: Mapping[str, str]) -> ObjectMeta:
            return self._around("put", self._key(full_key), lambda: put_whole(full_key, buffers, mode, metadata))

        def _head(full_key: str) -> ObjectMeta:
            return self._around("head", self._key(full_key), lambda: head(full_key))

        def _get_range(full_key: str, byte_range: ByteRange | None) -> bytes:
            return self._around("get", self._key(full_key), lambda: get_range(full_key, byte_range))

        def _read_into(full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
            self._around("get", self._key(full_key), lambda: read_into(full_key, offset, outs))

        def _list(full_prefix: str) -> Iterator[ObjectMeta]:
            return iter(self._around("list", self._key(full_prefix), lambda: list(list_(full_prefix))))

        def _delete_many(full_keys: Sequence[str]) -> None:
            for full_key in full_keys:
                self._around("delete", self._key(full_key), functools.partial(delete_many, [full_key]))

        def _begin_multipart(full_key: str, mode: WriteMode, metadata: Mapping[str, str], size: int,
                             part_size: int) -> MultipartUpload:
            return _FaultyUpload(self, self._key(full_key), begin(full_key, mode, metadata, size, part_size))

        for name, fn in [("_put_whole", _put_whole), ("_head", _head), ("_get_range", _get_range),
                         ("_read_into", _read_into), ("_list", _list), ("_delete_many", _delete_many),
                         ("_begin_multipart", _begin_multipart)]:
            setattr(store, name, fn)


class _FaultyUpload(MultipartUpload):
    def __init__(self, faults: PrimitiveFaults, key: str, inner: MultipartUpload) -> None:
        self._faults = faults
        self._key = key
        self._inner = inner

    def upload_part(self, index: int, pieces: Sequence[memoryview]) -> None:
        self._faults._around("part", self._key, lambda: self._inner.upload_part(index, pieces))

    def complete(self) -> ObjectMeta:
        return self._faults._around("complete", self._key, self._inner.complete)

    def abort(self) -> None:
        self._inner.abort()
