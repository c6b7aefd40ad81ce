"""CRC32C, the one checksum cloudckpt uses end to end.

Why CRC32C: S3 (``ChecksumCRC32C``) and GCS (``crc32c``) verify it server-side, and the
CPU computes it in hardware, so checking every byte on every save and restore costs
little next to moving the bytes.

Why the ``crc32c`` package: it reads any C-contiguous buffer in place (numpy arrays,
memoryviews of them, the destination of a restore) and releases the GIL while it runs, so
pool threads verify chunks in parallel. google-crc32c takes only ``bytes`` and forced a copy
of every byte; measured on one core over 1 GiB of numpy memory, 14.5 GB/s against 8.0 GB/s
for that copying path (docs/benchmarks.md, "CRC32C").
"""

from __future__ import annotations

import base64
import bisect
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from crc32c import crc32c as _crc32c


class Crc32c:
    """A running CRC32C, fed buffers of any kind as they arrive (a streamed copy, say).

    Any C-contiguous buffer is read in place, whatever its shape or item type.
    """

    def __init__(self) -> None:
        self.value = 0

    def update(self, buf: memoryview | bytes) -> None:
        self.value = _crc32c(buf, self.value)


def crc32c_of(buffers: Iterable[memoryview | bytes]) -> int:
    """CRC32C of the concatenation of ``buffers`` (each C-contiguous), without joining or copying them."""
    value = 0
    for buf in buffers:
        value = _crc32c(buf, value)
    return value


# crc(A + B) = crc(A) * x^(8 * len(B)) mod P  xor  crc(B).
_CRC32C_POLY = 0x82F63B78


def _gf2_multiply(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC32C polynomial, both in reflected bit order."""
    mask = 1 << 31
    product = 0
    while True:
        if a & mask:
            product ^= b
            if a & (mask - 1) == 0:
                return product
        mask >>= 1
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1


def _x_to_the_2_to_the(n: int) -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(1, n):
        table.append(_gf2_multiply(table[-1], table[-1]))
    return table


_X2N = _x_to_the_2_to_the(32)


@functools.lru_cache(maxsize=1024)
def _shift(length: int) -> int:
    """x^(8 * length) modulo the polynomial: what appending ``length`` bytes multiplies a CRC by.

    Cached: saves combine the same few lengths (1 MiB blocks, the sizes of a model's
    tensors) thousands of times, and one multiply is a third of the uncached cost.
    """
    power = 1 << 31  # x^0
    k = 3  # x^(8 * length) = product of x^(2^k) over the set bits of length, shifted by 3
    n = length
    while n:
        if n & 1:
            power = _gf2_multiply(_X2N[k & 31], power)
        n >>= 1
        k += 1
    return power


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32C of ``A + B`` from the CRC32C of each and the length of ``B`` (no data pass)."""
    return _gf2_multiply(_shift(length_b), crc_a) ^ crc_b if crc_a else crc_b


#: Pieces longer than this also get a CRC32C per block of this many bytes (recorded in the
#: index), so a restore that needs only part of a chunk - a resharding restore - can verify
#: exactly the blocks it read instead of trusting them or fetching the whole chunk.
CRC_BLOCK = 1024 * 1024


def crc32c_with_blocks(data: memoryview, block: int = CRC_BLOCK) -> tuple[int, tuple[int, ...]]:
    """``(CRC32C of data, CRC32C of each block)``; no blocks when ``data`` fits in one.

    One pass over the bytes: the whole CRC is combined from the block CRCs.
    """
    size = data.nbytes
    if size <= block:
        return crc32c_of([data]), ()
    blocks = tuple(crc32c_of([data[start:start + block]]) for start in range(0, size, block))
    return combine_blocks(blocks, block, size), blocks


def combine_blocks(blocks: Sequence[int], block: int, size: int) -> int:
    """CRC32C of ``size`` bytes from the CRC32Cs of its consecutive ``block``-byte blocks."""
    whole = blocks[0]
    for k, crc in enumerate(blocks[1:], start=1):
        whole = crc32c_combine(whole, crc, min(block, size - k * block))
    return whole


@dataclass(frozen=True, slots=True)
class KnownCrc:
    """The CRC32C of the ``length`` bytes at ``offset`` of an object, and of each ``block`` of them.

    ``blocks`` (empty when the range is one block or less) lets a range that covers only
    part of these bytes still use what is known for the whole blocks inside it.
    """

    offset: int
    length: int
    crc32c: int
    block: int = 0
    blocks: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.length


def crc32c_of_range(known: Sequence[KnownCrc], start: int, views: Sequence[memoryview]) -> int:
    """CRC32C of ``views``, the bytes at ``start`` of an object, reusing ``known`` (sorted by offset).

    Known ranges (and whole known blocks) inside the span are combined without reading
    their bytes; only what no known range covers - the edges where a request cuts a
    piece, padding between pieces - is read. Equal to ``crc32c_of(views)`` whenever the
    known values are true of these bytes (a stale one makes the store refuse the body,
    which is the point of sending a checksum).
    """
    end = start + sum(v.nbytes for v in views)
    value = 0
    position = start  # bytes before this are in ``value``
    cursor = _Cursor(views, start)
    first = bisect.bisect_right(known, start, key=lambda k: k.end)
    for k in known[first:]:
        if k.offset >= end:
            break
        lo, hi = max(k.offset, start), min(k.end, end)
        if lo > position:
            value = cursor.crc(position, lo, value)
        if lo == k.offset and hi == k.end:
            value = crc32c_combine(value, k.crc32c, k.length)
        elif k.blocks:
            value = _blocks_of(k, lo, hi, cursor, value)
        else:
            value = cursor.crc(lo, hi, value)
        position = hi
    return cursor.crc(position, end, value) if position < end else value


def _blocks_of(k: KnownCrc, lo: int, hi: int, cursor: _Cursor, value: int) -> int:
    """Continue ``value`` over ``[lo, hi)`` of ``k``: its whole blocks combined, the cut ones read."""
    position = lo
    for i in range((lo - k.offset) // k.block, -(-(hi - k.offset) // k.block)):
        block_lo = k.offset + i * k.block
        block_hi = min(block_lo + k.block, k.end)
        if block_lo >= position and block_hi <= hi:
            if block_lo > position:
                value = cursor.crc(position, block_lo, value)
            value = crc32c_combine(value, k.blocks[i], block_hi - block_lo)
            position = block_hi
    return cursor.crc(position, hi, value) if position < hi else value


class _Cursor:
    """Reads ``[a, b)`` of an object out of views of its bytes from ``start``, front to back."""

    def __init__(self, views: Sequence[memoryview], start: int) -> None:
        self._views = views
        self._index = 0
        self._view_start = start

    def crc(self, a: int, b: int, value: int) -> int:
        """``value`` continued over bytes ``[a, b)``; calls come in increasing, non-overlapping order."""
        while a < b:
            view = self._views[self._index]
            view_end = self._view_start + view.nbytes
            if a >= view_end:
                self._index += 1
                self._view_start = view_end
                continue
            take_end = min(b, view_end)
            value = _crc32c(view[a - self._view_start:take_end - self._view_start], value)
            a = take_end
        return value


def crc32c_base64(value: int) -> str:
    """The wire form S3 and GCS use: base64 of the big-endian 4 bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")
