"""Request bodies for S3 writes, sent from the caller's buffers without joining them.

botocore takes ``bytes`` or a file-like body, not a list of memoryviews; ``body`` joins a
small one (no ``Expect: 100-continue`` round trip) and wraps a large one in ``BufferReader``.
Split out of ``s3`` (issue 23). GET bodies are read by ``transfer.direct_reader``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cloudckpt.storage.values import MiB

#: Bodies up to this size are sent as ``bytes`` (a cheap join); larger ones stream from
#: the caller's buffers. botocore sends ``Expect: 100-continue`` for streamed bodies,
#: which costs a round trip that small index/state writes should not pay.
SMALL_BODY = 1 * MiB


class BufferReader:
    """A read-only, seekable file over memoryviews, so botocore streams the caller's bytes.

    botocore accepts bytes, bytearray or a file-like body - not a memoryview - and would
    otherwise force a copy of every part. ``read(n)`` hands out zero-copy slices (possibly
    shorter than ``n`` at a buffer boundary, as a raw file may), which urllib3 passes
    straight to ``socket.sendall``.
    """

    def __init__(self, buffers: Sequence[memoryview]) -> None:
        self._buffers = [b for b in buffers if b.nbytes]
        self._size = sum(b.nbytes for b in self._buffers)
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes | memoryview:
        if size is None or size < 0:
            chunks = []
            while piece := self.read(self._size):
                chunks.append(bytes(piece))
            return b"".join(chunks)
        start = self._pos
        for buf in self._buffers:
            if start < buf.nbytes:
                piece = buf[start:start + size]
                self._pos += piece.nbytes
                return piece
            start -= buf.nbytes
        return b""

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = min(max(base + offset, 0), self._size)
        return self._pos

    def tell(self) -> int:
        return self._pos


def body(buffers: Sequence[memoryview], size: int) -> bytes | BufferReader:
    """Small bodies joined into bytes (no 100-continue round trip), large ones streamed."""
    if size <= SMALL_BODY:
        return b"".join(buffers)
    return BufferReader(buffers)

