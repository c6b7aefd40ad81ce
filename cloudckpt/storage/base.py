"""The storage interface every backend implements, and the machinery they share.

Shape borrowed from zarr-python v3's store ABC and obspec's vocabulary: one verb per
concept (``get``, ``read_into``, ``head``, ``put``, ``delete``, ``list``), conditional
writes as a ``mode`` argument. Everything is synchronous; concurrency lives in one
bounded thread pool per storage object, used by the multipart writer and the ranged
reader (never an async twin of each method).

Value types live in ``values.py``, key checks in ``keys.py``, the write path (one request
or a multipart upload, and the ``MultipartUpload`` a backend implements) in ``writes.py``,
the ranged reader's planning in ``reads.py``, the span/part bookkeeping in ``parts.py``;
this module is the ``Storage`` class itself.

Backends implement a handful of primitives on *full* keys (the storage root's prefix
already joined). This class validates keys and ranges, retries transient failures,
splits large writes into parts and large reads into ranges, and handles the conditional
write retry trap with a writer nonce. The call order for a write is::

    put -> [size <= threshold] _put_whole            (retried)
        -> [size >  threshold] _begin_multipart -> upload_part x N (parallel, retried)
                                                -> complete (retried) | abort on any failure

Why still ~440 lines: what is left is the template every backend fills in - the public
verbs, whose docstrings are the interface's documentation, with their one retry layer and
validation, wrapped around the hooks a backend implements (and the per-process memos and
the pool those hooks share) - and the two must be read side by side. The machinery has
modules of its own: ``writes``, ``reads``, ``parts``, ``transfer``, ``retry``, ``throttle``
and the client caches in ``clients``.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar, cast

from cloudckpt.errors import (
    BucketNotFoundError,
    InvalidRangeError,
    NotFoundError,
    StorageError,
    TransientError,
)
from cloudckpt.storage.checksum import crc32c_base64 as crc32c_base64  # re-exported for backends
from cloudckpt.storage.checksum import crc32c_of as crc32c_of
from cloudckpt.storage.clients import BUCKETS_SEEN, CAPABILITIES
from cloudckpt.storage.keys import file_in_the_way as file_in_the_way
from cloudckpt.storage.keys import translate_os_error as translate_os_error
from cloudckpt.storage.keys import validate_key as validate_key
from cloudckpt.storage.parts import consume_pieces, exact
from cloudckpt.storage.reads import read_tasks
from cloudckpt.storage.retry import call_with_retry
from cloudckpt.storage.throttle import AdaptiveConcurrency, TransferStats
from cloudckpt.storage.transfer import Cancellation, RateLimiter, as_buffers, gather, slice_pieces
from cloudckpt.storage.values import PROBE_PREFIX as PROBE_PREFIX
from cloudckpt.storage.values import TEMP_PREFIX as TEMP_PREFIX
from cloudckpt.storage.values import TEMP_SUFFIX as TEMP_SUFFIX
from cloudckpt.storage.values import WRITER_NONCE_KEY as WRITER_NONCE_KEY
from cloudckpt.storage.values import ByteRange as ByteRange
from cloudckpt.storage.values import GiB as GiB
from cloudckpt.storage.values import MiB as MiB
from cloudckpt.storage.values import ObjectMeta as ObjectMeta
from cloudckpt.storage.values import ReadRequest as ReadRequest
from cloudckpt.storage.values import TransferConfig as TransferConfig
from cloudckpt.storage.values import UpdateVersion as UpdateVersion
from cloudckpt.storage.values import WriteMode as WriteMode
from cloudckpt.storage.writes import MultipartUpload as MultipartUpload
from cloudckpt.storage.writes import write

T = TypeVar("T")
log = logging.getLogger("cloudckpt.storage")

class Storage(ABC):
    """A prefix of an object store (or a local directory) holding checkpoint objects.

    Keys are ``/``-separated paths relative to the root URL. Subclasses implement the
    ``_``-prefixed primitives; callers use only the public verbs.
    """

    #: URL schemes this backend serves (for ``open_storage``).
    schemes: ClassVar[tuple[str, ...]] = ()
    #: Whether ``create`` / ``UpdateVersion`` modes are honoured atomically.
    supports_conditional_writes: bool = True
    #: Whether large objects go up in parallel parts; without it every put is one write.
    supports_multipart: bool = True
    #: The largest object one request may write (S3: 5 GiB); ``None``: no limit.
    max_put_size: ClassVar[int | None] = None
    #: Whether the store scales request rates per key prefix (S3, GCS): a save of many data
    #: objects then spreads them over hashed sub-prefixes (``format.data_key(spread=True)``).
    partitions_by_prefix: ClassVar[bool] = False

    def __init__(self, url: str, config: TransferConfig | None = None) -> None:
        self._url = url.rstrip("/")
        self.config = config or TransferConfig()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._pool_lock = threading.Lock()
        self._upload_limiter = RateLimiter(self.config.max_bandwidth)
        self._download_limiter = RateLimiter(self.config.max_bandwidth)
        self._cancel = Cancellation()
        self._concurrency = AdaptiveConcurrency(self.config.max_concurrency)

    # ------------------------------------------------------------------ naming
    @property
    def url(self) -> str:
        """The root URL, without a trailing slash."""
        return self._url

    def url_for(self, key: str) -> str:
        """The full URL of ``key`` (for messages and for users)."""
        return f"{self._url}/{key}" if key else self._url

    @property
    @abstractmethod
    def _prefix(self) -> str:
        """What precedes every key in the backend's namespace ('' or ending in '/')."""

    def _full(self, key: str) -> str:
        return self._prefix + validate_key(key, self.url_for(key))

    def _url_of_full(self, full_key: str) -> str:
        """The user-facing URL of a full key (for messages raised inside primitives)."""
        return self.url_for(full_key[len(self._prefix):] if full_key.startswith(self._prefix) else full_key)

    def _relative(self, meta: ObjectMeta) -> ObjectMeta:
        return replace(meta, key=meta.key[len(self._prefix):])

    # ------------------------------------------------------------------ primitives
    @abstractmethod
    def _head(self, full_key: str) -> ObjectMeta:
        """Metadata of one object; raise the SDK's not-found error if absent."""

    @abstractmethod
    def _get_range(self, full_key: str, byte_range: ByteRange | None) -> bytes:
        """Bytes of the whole object or of a validated range."""

    def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
        """Fill the buffers ``outs`` (flat, non-empty) with consecutive bytes from ``offset``, in one request.

        Backends override this to stream the response straight into the buffers (no
        intermediate ``bytes``, no copy); this default reads the range and copies it out.
        """
        size = sum(out.nbytes for out in outs)
        data = self._get_range(full_key, ByteRange.bounded(offset, offset + size))
        if len(data) != size:
            url = self._url_of_full(full_key)
            raise InvalidRangeError(f"{url} ends before byte {offset + size} "
                                    f"(got {len(data)} of {size} requested bytes)", url)
        position = 0
        for out in outs:
            out[:] = data[position:position + out.nbytes]
            position += out.nbytes

    @abstractmethod
    def _put_whole(self, full_key: str, buffers: Sequence[memoryview], mode: WriteMode,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        """Write an object in one request (or one local file)."""

    @abstractmethod
    def _begin_multipart(self, full_key: str, mode: WriteMode, metadata: Mapping[str, str],
                         size: int, part_size: int) -> MultipartUpload:
        """Start a multipart write of ``size`` bytes in parts of ``part_size``."""

    @abstractmethod
    def _delete_many(self, full_keys: Sequence[str]) -> None:
        """Delete the keys; missing ones are not an error."""

    @abstractmethod
    def _list(self, full_prefix: str) -> Iterator[ObjectMeta]:
        """Every object whose full key starts with ``full_prefix`` (plain string prefix)."""

    @abstractmethod
    def _is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth retrying (throttling, 5xx, resets, timeouts)."""

    @abstractmethod
    def _translate(self, exc: BaseException, url: str) -> BaseException:
        """Map an SDK error onto the cloudckpt tree (most specific first)."""

    def _is_throttle(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the store asking for fewer requests (503 SlowDown, 429)."""
        return False

    def _part_size(self, size: int) -> int:
        """Part size for an object of ``size`` bytes; S3 raises it to fit its part limit."""
        return self.config.part_size

    # ------------------------------------------------------------------ per-process memos
    def _store_identity(self) -> tuple[str, ...]:
        """Which store (and bucket) this is, for memos shared by every storage object on it."""
        return (type(self).__name__, self._url)

    def _capability(self, what: str, probe: Callable[[], T], url: str) -> T:
        """The answer of capability probe ``what`` on this store: run once per process, fork-safe.

        Concurrent first writers wait for one probe instead of each running their own; a
        probe that fails is not remembered, so the next write tries again.
        """
        key = (*self._store_identity(), what)
        return cast(T, CAPABILITIES.get(key, lambda: self._call(probe, url, describe=f"probe {what} of")))

    def _warm_capability(self, what: str, probe: Callable[[], Any]) -> None:
        """Start probe ``what`` on a background thread unless its answer is known or coming."""
        CAPABILITIES.warm((*self._store_identity(), what),
                          lambda: self._call(probe, self.url, describe=f"probe {what} of"))

    def _bucket_exists(self) -> bool | None:
        """Stores with buckets: whether the bucket exists (``None``: cannot tell). Error paths only."""
        return True

    def _saw_bucket(self) -> None:
        """Remember (for this process) that the bucket exists: a later 404 is an object's."""
        BUCKETS_SEEN.set(self._store_identity(), True)

    def _bucket_missing(self) -> bool:
        """Whether a bare 404/403 means the bucket is gone (one probe per bucket and process).

        An inconclusive probe (network, no permission) counts as "the bucket exists".
        """
        if BUCKETS_SEEN.peek(self._store_identity()):
            return False
        try:
            exists = self._bucket_exists()
        except Exception as exc:
            log.debug("bucket probe of %s failed: %s", self.url, exc)
            return False
        if exists:
            self._saw_bucket()
        return exists is False

    # ------------------------------------------------------------------ plumbing
    def _executor(self) -> ThreadPoolExecutor:
        """The bounded pool, rebuilt after a fork (threads do not survive one)."""
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(
                    max_workers=self.config.max_concurrency,
                    thread_name_prefix=f"cloudckpt-{type(self).__name__}")
                self._pool_pid = os.getpid()
            return self._pool

    def _call(self, fn: Callable[[], T], url: str, *, describe: str,
              on_retry: Callable[[BaseException, int], None] | None = None) -> T:
        """Run one primitive with retries; translate whatever escapes."""
        try:
            return call_with_retry(fn, policy=self.config.retry, is_transient=self._is_transient,
                                   describe=f"{describe} {url}", on_retry=on_retry,
                                   is_throttle=self._is_throttle, gate=self._concurrency)
        except StorageError:
            raise
        except Exception as exc:
            translated = self._translate(exc, url)
            if translated is exc:
                raise
            if self._is_transient(exc) and not isinstance(translated, TransientError):
                translated = TransientError(f"{describe} {url} kept failing: {exc}", url)
            try:
                raise translated from exc
            finally:
                # The raised error's traceback holds this frame; kept in its locals, the error would
                # close a reference cycle through every caller's frame (a save's arrays included),
                # freed only by the cyclic GC - an expected "not found" on every save's HEAD did that.
                del translated

    def _run_parallel(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Run tasks on the pool; wait for all; raise the first failure."""
        if len(tasks) == 1:
            tasks[0]()
            return
        pool = self._executor()
        futures: list[Future[None]] = [pool.submit(task) for task in tasks]
        gather(futures)

    # ------------------------------------------------------------------ reads
    def head(self, key: str) -> ObjectMeta:
        """Size, version and user metadata of ``key``; ``NotFoundError`` if absent."""
        full = self._full(key)
        return self._relative(self._call(lambda: self._head(full), self.url_for(key), describe="HEAD"))

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists. A missing *bucket* is an error, not "no such key":
        a mistyped bucket must not look like "no checkpoint yet"."""
        try:
            self.head(key)
        except BucketNotFoundError:
            raise
        except NotFoundError:
            return False
        return True

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        """The object's bytes, or the bytes of ``byte_range``."""
        full = self._full(key)
        url = self.url_for(key)
        if byte_range is not None:
            byte_range.validate(url)
            if byte_range.length == 0:
                self.head(key)  # an empty range of a missing key is still an error
                return b""
        data = self._call(lambda: self._get_range(full, byte_range), url, describe="GET")
        expected = byte_range.length if byte_range is not None else None
        if byte_range is not None and expected is not None and len(data) != expected:
            raise InvalidRangeError(
                f"range {byte_range.http_header()} of {url} runs past the end of the object "
                f"(got {len(data)} of {expected} bytes)", url)
        self._download_limiter.consume(len(data))
        return data

    def read_into(self, requests: Sequence[ReadRequest]) -> None:
        """Fill every request's buffer, in parallel ranged reads; run each ``done`` as it lands.

        This is the restore hot path. Requests for adjacent bytes of one object are read
        together: each object's runs of adjacent requests are cut into spans of at most
        ``read_chunk_size`` bytes (smaller when the object is read by fewer requests than
        the pool has threads), and each span is one request to the store that streams into
        the destination buffers it covers - hundreds of small arrays cost a few GETs, not
        hundreds, and no byte is copied twice. A request's ``done`` runs on the thread
        that landed its last span.
        """
        self._run_parallel(read_tasks(self, requests))

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``[start, end)`` ranges of one object, fetched in parallel."""
        outs = []
        for start, end in ranges:
            ByteRange.bounded(start, end).validate(self.url_for(key))
            outs.append(bytearray(end - start))
        self.read_into([ReadRequest(key, start, memoryview(buf))
                        for (start, _), buf in zip(ranges, outs, strict=True)])
        return [bytes(buf) for buf in outs]

    def list(self, prefix: str = "") -> list[ObjectMeta]:
        """Objects whose key starts with ``prefix`` (a string prefix, not a directory), sorted."""
        if prefix:
            validate_key(prefix.rstrip("/") or prefix, self.url_for(prefix))
        full_prefix = self._prefix + prefix
        metas = self._call(lambda: list(self._list(full_prefix)), self.url_for(prefix),
                           describe="LIST")
        return sorted((self._relative(m) for m in metas), key=lambda m: m.key)

    # ------------------------------------------------------------------ writes
    def put(self, key: str, data: Any, *, mode: WriteMode = "overwrite",
            metadata: Mapping[str, str] | None = None) -> ObjectMeta:
        """Write ``data`` (bytes-like, or a sequence of them, concatenated) as one object.

        The object appears whole or not at all. ``mode``: ``"overwrite"``; ``"create"``
        (``AlreadyExistsError`` if present); ``UpdateVersion(v)`` (``PreconditionError``
        unless the current version is ``v``; ``NotFoundError``-or-``PreconditionError``
        if absent, depending on the store). Returns the new object's metadata.
        """
        buffers = as_buffers(data)
        size = sum(b.nbytes for b in buffers)
        return write(self, key, size, lambda: buffers, lambda start, end: slice_pieces(buffers, start, end),
                           mode, metadata, None)

    def put_stream(self, key: str, size: int, read: Callable[[int, int], Any], *, mode: WriteMode = "overwrite",
                   metadata: Mapping[str, str] | None = None,
                   consume: Callable[[int, memoryview], None] | None = None) -> ObjectMeta:
        """Write a ``size``-byte object whose bytes ``read(start, end)`` produces, part by part.

        For objects that should not sit in memory whole - copying a checkpoint between
        stores. Above the multipart threshold, parts are read and uploaded on the pool with
        at most ``max_concurrency`` parts in memory; below it, ``read(0, size)`` is called
        once. ``consume(start, part)``, if given, sees every part in order on the calling
        thread (for checksums computed as the bytes pass). Same ``mode`` semantics and
        atomicity as :meth:`put`.

        Raises:
            ValueError: ``read`` returned a part of the wrong length.
        """
        def whole() -> list[memoryview]:
            pieces = exact(read(0, size), 0, size, self.url_for(key))
            if consume is not None:
                consume_pieces(consume, 0, pieces)
            return pieces

        return write(self, key, size, whole, read, mode, metadata, consume)

    def _require_conditional(self, url: str) -> None:  # noqa: B027 - optional hook
        """Backends that cannot honour conditional modes override this to raise."""

    def _warm_up_conditional(self) -> None:  # noqa: B027 - optional hook
        """Start, in the background, what ``_require_conditional`` will need (S3: its probe).

        Called by every plain write: a save uploads its data objects with plain writes
        and commits its index with a conditional one, so a capability probe started here
        runs while the data moves instead of in front of the commit.
        """

    def prepare_conditional_writes(self) -> None:
        """Say a conditional write is coming: what it needs starts now, in the background.

        S3: the once-per-process probe of whether the store honours ``If-None-Match`` (three
        small requests). A save calls this (through ``format.index_fetch.head_index``) before
        its first request, so the probe runs alongside the save instead of in front of its
        commit (issue 27, first request). Cheap when the answer is known; no-op elsewhere.
        """
        self._warm_up_conditional()

    def _multipart_honours(self, mode: WriteMode, url: str) -> bool:
        """Whether the request that completes a multipart write honours ``mode``'s condition."""
        return True

    def delete(self, keys: str | Iterable[str]) -> None:
        """Delete one key or many (in bulk where the store can); missing keys are fine."""
        key_list = [keys] if isinstance(keys, str) else list(keys)
        if not key_list:
            return
        fulls = [self._full(k) for k in key_list]
        url = self.url_for(key_list[0]) if len(key_list) == 1 else f"{self.url} ({len(key_list)} keys)"
        self._call(lambda: self._delete_many(fulls), url, describe="DELETE")

    def transfer_stats(self) -> TransferStats:
        """Requests, throttled answers, retries and the concurrency throttling left (see throttle.py).

        One adaptive limit serves every thread and transfer of this storage object: a
        throttled answer halves the requests it lets into flight, successes raise it back
        towards ``TransferConfig.max_concurrency``.
        """
        return self._concurrency.stats()

    def cancel_transfers(self) -> None:
        """Stop every write of this storage object that is in flight, promptly.

        For a caller that was interrupted (Ctrl-C) while other threads upload: no new part
        starts, parts already on the wire finish (so the wait is bounded by one part), and
        each cancelled write aborts its multipart upload (S3) or deletes its chunk objects
        (GCS) and raises ``TransferCancelledError``. Nothing is committed by a cancelled
        write. Writes started after this call run normally.
        """
        self._cancel.cancel()

    def server_time(self) -> datetime:
        """The store's clock (S3/GCS: the ``Date`` header of a request), timezone-aware.

        Cleanup of crashed saves compares object ages with this clock, never the local
        one: a VM's clock can be off by minutes, the store's stamped the objects.
        """
        return datetime.now(timezone.utc)

    def close(self) -> None:
        """Stop the thread pool. The storage object stays usable (a new pool starts lazily)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
