"""The write path behind ``Storage.put`` / ``put_stream``: one request, or a multipart upload.

``write`` picks the path: one request up to the multipart threshold (or where the store
ignores conditions on the request that completes a multipart write), else ``put_multipart``,
which begins an upload (a backend's ``MultipartUpload``), reads and uploads its parts on the
storage's bounded pool with at most ``max_concurrency`` parts in memory (``upload_parts``),
completes it and aborts it on any failure. Both go through ``conditional_aware``: a retried
conditional write that is refused may have been refused by our own first attempt, and the
writer nonce tells. Split out of ``base`` (issue 23).
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

from cloudckpt.errors import NotFoundError, NotSupportedError, PreconditionError
from cloudckpt.storage.parts import PartSource, consume_pieces, exact
from cloudckpt.storage.transfer import CancelToken, part_boundaries
from cloudckpt.storage.values import WRITER_NONCE_KEY, ObjectMeta, UpdateVersion, WriteMode

if TYPE_CHECKING:
    from cloudckpt.storage.base import Storage

log = logging.getLogger("cloudckpt.storage")


class MultipartUpload(ABC):
    """One in-flight multipart write, as a backend implements it.

    ``upload_part`` is called from pool threads, concurrently, with 0-based indexes and
    the part as a list of pieces (views of the caller's buffers - a part spanning several
    arrays is never joined into a copy); ``complete`` once after every part succeeded;
    ``abort`` on any failure (it must not raise for parts that never arrived). S3 maps
    this onto its multipart API, GCS onto chunk objects + compose, local disk onto
    positional writes into a temp file.
    """

    @abstractmethod
    def upload_part(self, index: int, pieces: Sequence[memoryview]) -> None: ...

    @abstractmethod
    def complete(self) -> ObjectMeta: ...

    @abstractmethod
    def abort(self) -> None: ...



def put_multipart(storage: Storage, full: str, url: str, source: PartSource, mode: WriteMode,
                  meta: Mapping[str, str], nonce: str, cancel: CancelToken) -> ObjectMeta:
    """Begin, upload every part, complete; abort on any failure (a cancelled write too)."""
    part_size = storage._part_size(source.size)
    upload = storage._call(lambda: storage._begin_multipart(full, mode, meta, source.size, part_size), url,
                           describe="begin multipart upload of")
    try:
        bounds = part_boundaries(source.size, part_size)
        upload_parts(storage, upload, source, bounds, url, cancel)
        log.debug("uploaded %d parts of %s", len(bounds), url)
        cancel.check(url)
        return conditional_aware(storage, upload.complete, full, url, mode, nonce, "complete multipart upload of")
    except BaseException:
        try:
            upload.abort()
        except Exception as abort_exc:
            log.warning("could not abort multipart upload of %s: %s", url, abort_exc)
        raise


def upload_parts(storage: Storage, upload: MultipartUpload, source: PartSource,
                 bounds: Sequence[tuple[int, int]], url: str, cancel: CancelToken) -> None:
    """Read and upload parts on the pool, a bounded window of them in memory; consume in order.

    A cancelled write (``cancel_transfers``) starts no further part: each part checks
    its token before it reads or sends, so at most the parts already on the wire finish.
    """
    def part(index: int, start: int, end: int) -> list[memoryview]:
        cancel.check(url)
        pieces = exact(source.read(start, end), start, end, url)
        storage._call(lambda: upload.upload_part(index, pieces), url, describe=f"upload part {index + 1} of")
        storage._upload_limiter.consume(end - start)
        return pieces

    pool = storage._executor()
    window: deque[tuple[int, Future[list[memoryview]]]] = deque()

    def drain_one() -> None:
        start, future = window.popleft()
        pieces = future.result()
        if source.consume is not None:
            consume_pieces(source.consume, start, pieces)

    try:
        for index, (start, end) in enumerate(bounds):
            if len(window) >= storage.config.max_concurrency:
                drain_one()
            cancel.check(url)
            window.append((start, pool.submit(part, index, start, end)))
        while window:
            drain_one()
    except BaseException:
        for _, future in window:
            future.cancel()
        wait([future for _, future in window])  # no part may still upload once the caller aborts
        raise


def write(storage: Storage, key: str, size: int, whole: Callable[[], Sequence[memoryview]],
          read: Callable[[int, int], Any], mode: WriteMode, metadata: Mapping[str, str] | None,
          consume: Callable[[int, memoryview], None] | None) -> ObjectMeta:
    """The one write path: one PUT up to the threshold, multipart above it.

    A conditional write above the threshold still goes up as one request where the
    store ignores the condition on the request that completes a multipart write
    (``_multipart_honours``): correct and atomic, not parallel.
    """
    full = storage._full(key)
    url = storage.url_for(key)
    if mode not in ("overwrite", "create") and not isinstance(mode, UpdateVersion):
        raise ValueError(f"put mode must be 'overwrite', 'create' or UpdateVersion, got {mode!r}")
    if mode == "overwrite":
        storage._warm_up_conditional()
    else:
        storage._require_conditional(url)
    cancel = storage._cancel.token()
    nonce = uuid.uuid4().hex
    meta = {**(metadata or {}), WRITER_NONCE_KEY: nonce}
    one_request = size <= storage.config.multipart_threshold or not storage.supports_multipart
    if not one_request and mode != "overwrite" and not storage._multipart_honours(mode, url):
        if storage.max_put_size is not None and size > storage.max_put_size:
            raise NotSupportedError(
                f"{url}: this store ignores conditions on the request that completes a multipart write, "
                f"and the object ({size} bytes) is above its {storage.max_put_size}-byte single-request "
                f"limit; write it with mode='overwrite'", url)
        log.debug("%s: conditional write as one request (the store ignores conditions on multipart)", url)
        one_request = True
    if one_request:
        buffers = whole()
        cancel.check(url)
        result = conditional_aware(
            storage, lambda: storage._put_whole(full, buffers, mode, meta), full, url, mode, nonce, "PUT")
        storage._upload_limiter.consume(size)
    else:  # each part accounts for itself as it goes
        result = put_multipart(storage, full, url, PartSource(size, read, whole, consume), mode, meta, nonce,
                               cancel)
    return storage._relative(result)


def conditional_aware(storage: Storage, op: Callable[[], ObjectMeta], full: str, url: str,
                      mode: WriteMode, nonce: str, describe: str) -> ObjectMeta:
    """Retry ``op``; if a *retried* conditional write is refused, check whether it landed.

    A timeout can hide a success: the retry then sees 412 (or 404 / NoSuchUpload)
    because of our own first attempt. The nonce in the object's metadata tells.
    """
    retried = False

    def mark(_exc: BaseException, _attempt: int) -> None:
        nonlocal retried
        retried = True

    try:
        return storage._call(op, url, describe=describe, on_retry=mark)
    except (PreconditionError, NotFoundError) as refused:
        if not retried:
            raise
        try:
            current = storage._call(lambda: storage._head(full), url, describe="HEAD")
        except NotFoundError:
            raise refused from None  # nothing landed: the refusal stands (not the HEAD's 404)
        if current.metadata.get(WRITER_NONCE_KEY) == nonce:
            log.info("%s %s: an earlier attempt had landed; treating as success", describe, url)
            return current
        raise
