"""The ranged reader behind ``Storage.read_into``: requests merged into spans, one task each.

The tasks run on the storage's bounded pool (``Storage._run_parallel``); each is one ranged
request through the storage's retry layer, streamed into the caller's buffers. Split out of
``base`` (issue 23).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cloudckpt.errors import InvalidRangeError
from cloudckpt.storage.parts import MIN_SPAN, Countdown, spans
from cloudckpt.storage.values import ReadRequest

if TYPE_CHECKING:
    from cloudckpt.storage.base import Storage


def read_tasks(storage: Storage, requests: Sequence[ReadRequest]) -> list[Callable[[], None]]:
    """The tasks that fill ``requests``: adjacent requests of one object merged into spans.

    Each object's runs of adjacent requests are cut into spans of at most ``read_chunk_size``
    bytes (smaller when the object is read by fewer requests than the pool has threads); each
    span is one request that streams into the buffers it covers. An empty request is a HEAD
    (a missing key is still an error).
    """
    tasks: list[Callable[[], None]] = []
    by_key: dict[str, list[tuple[int, memoryview, Countdown | None]]] = {}
    for req in requests:
        out = req.out.cast("B") if req.out.format != "B" or req.out.ndim != 1 else req.out
        if req.offset < 0:
            raise InvalidRangeError(f"negative offset {req.offset} for {storage.url_for(req.key)}",
                                    storage.url_for(req.key))
        if out.nbytes == 0:  # nothing to read, but a missing key is still an error
            tasks.append(head_task(storage, req.key, req.done))
            continue
        by_key.setdefault(req.key, []).append((req.offset, out, None if req.done is None else Countdown(req.done)))
    for key, items in by_key.items():
        full, url = storage._full(key), storage.url_for(key)
        span = span_for(storage, sum(out.nbytes for _, out, _ in items))
        for offset, pieces in spans(items, span):
            tasks.append(read_task(storage, full, url, offset, pieces))
    return tasks


def span_for(storage: Storage, total: int) -> int:
    """Bytes per ranged read of an object read ``total`` bytes of: enough reads to keep the pool busy."""
    per_thread = -(-total // storage.config.max_concurrency)
    return max(1, min(storage.config.read_chunk_size, max(per_thread, MIN_SPAN)))


def head_task(storage: Storage, key: str, done: Callable[[], None] | None) -> Callable[[], None]:
    full, url = storage._full(key), storage.url_for(key)

    def task() -> None:
        storage._call(lambda: storage._head(full), url, describe="HEAD")
        if done is not None:
            done()
    return task


def read_task(storage: Storage, full: str, url: str, offset: int,
              pieces: Sequence[tuple[memoryview, Countdown | None]]) -> Callable[[], None]:
    outs = [out for out, _ in pieces]
    size = sum(out.nbytes for out in outs)

    def task() -> None:
        storage._call(lambda: storage._read_into(full, offset, outs), url, describe="GET")
        storage._download_limiter.consume(size)
        for _, landed in pieces:
            if landed is not None:
                landed()
    return task
