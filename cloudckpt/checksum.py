"""CRC32C, the one checksum cloudckpt uses end to end.

Why CRC32C: S3 (``ChecksumCRC32C``) and GCS (``crc32c``) verify it server-side, and
google-crc32c computes it in hardware at memory speed, so checking every byte on every
save and restore costs almost nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import google_crc32c

#: google-crc32c's C extension takes only ``bytes`` (its ``y#`` argument refuses
#: memoryview, bytearray and numpy buffers), so other buffers are fed in slices this
#: small: each copy stays in cache and memory stays bounded.
_SLICE = 256 * 1024


class Crc32c:
    """A running CRC32C, fed buffers of any kind as they arrive (a streamed copy, say)."""

    def __init__(self) -> None:
        self._checksum = google_crc32c.Checksum()  # type: ignore[no-untyped-call]

    def update(self, buf: memoryview | bytes) -> None:
        if isinstance(buf, bytes):
            self._checksum.update(buf)  # type: ignore[no-untyped-call]
            return
        view = memoryview(buf)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        for start in range(0, view.nbytes, _SLICE):
            self._checksum.update(bytes(view[start:start + _SLICE]))  # type: ignore[no-untyped-call]

    @property
    def value(self) -> int:
        return int.from_bytes(self._checksum.digest(), "big")  # type: ignore[no-untyped-call]


def crc32c_of(buffers: Iterable[memoryview | bytes]) -> int:
    """CRC32C of the concatenation of ``buffers``, without joining them."""
    checksum = Crc32c()
    for buf in buffers:
        checksum.update(buf)
    return checksum.value


def crc32c_base64(value: int) -> str:
    """The wire form S3 and GCS use: base64 of the big-endian 4 bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")
