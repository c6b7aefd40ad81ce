"""How ``Storage`` cuts reads into spans and writes into parts (no I/O here: pure bookkeeping)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cloudckpt.storage.transfer import as_buffers
from cloudckpt.storage.values import MiB

#: Smallest span ``read_into`` cuts an object's reads into when spreading them over the pool.
MIN_SPAN = 1 * MiB


class Countdown:
    """Runs ``fn`` when the last of ``pieces`` reads has landed, on whichever thread landed it.

    ``read_into`` counts ``pieces`` up while it cuts a request's spans, before any read
    starts; a caller that splits one read over several requests gives their number.
    """

    def __init__(self, fn: Callable[[], None], pieces: int = 0) -> None:
        self.pieces = pieces
        self._fn = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.pieces -= 1
            last = self.pieces == 0
        if last:
            self._fn()


def spans(items: list[tuple[int, memoryview, Countdown | None]],
           span: int) -> Iterator[tuple[int, list[tuple[memoryview, Countdown | None]]]]:
    """``(offset, pieces)`` per ranged read: runs of adjacent requests cut every ``span`` bytes.

    ``items`` are ``(offset, flat buffer, countdown)`` of one object. Overlapping requests
    go to separate reads (each buffer gets its own bytes); each piece counts on its
    request's countdown.
    """
    items.sort(key=lambda item: item[0])
    start = end = -1
    pieces: list[tuple[memoryview, Countdown | None]] = []
    for offset, out, landed in items:
        if offset != end or end - start >= span:
            if pieces:
                yield start, pieces
            start, end, pieces = offset, offset, []
        position = 0
        while position < out.nbytes:
            if end - start >= span:
                yield start, pieces
                start, pieces = end, []
            take = min(out.nbytes - position, span - (end - start))
            pieces.append((out[position:position + take], landed))
            if landed is not None:
                landed.pieces += 1
            position += take
            end += take
    if pieces:
        yield start, pieces


@dataclass(frozen=True, slots=True)
class PartSource:
    """Where a multipart write's bytes come from: ``read(start, end)`` per part, or ``whole()``."""

    size: int
    read: Callable[[int, int], Any]
    whole: Callable[[], Sequence[memoryview]]
    consume: Callable[[int, memoryview], None] | None = None


def exact(data: Any, start: int, end: int, url: str) -> list[memoryview]:
    """``data`` (bytes-like or a list of them) as flat byte views, refused unless exactly ``[start, end)``."""
    pieces = as_buffers(data)
    size = sum(p.nbytes for p in pieces)
    if size != end - start:
        raise ValueError(f"writing {url}: the source gave {size} bytes for [{start}, {end}), expected {end - start}")
    return pieces


def consume_pieces(consume: Callable[[int, memoryview], None], start: int, pieces: Sequence[memoryview]) -> None:
    for piece in pieces:
        consume(start, piece)
        start += piece.nbytes
