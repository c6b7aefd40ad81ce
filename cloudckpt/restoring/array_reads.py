"""Reading a checkpoint's arrays: stream their bytes into destination buffers and verify them.

Restore is the hot path: every chunk is fetched with a ranged read straight into the
destination array's memory (no intermediate copy), in parallel on the storage's pool,
and each is verified against the CRC32C the writer recorded as soon as it lands, on the
pool thread that read it. Only the chunks asked for are fetched, so reading one variable
out of a large checkpoint costs one small GET.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ChecksumError,
    InvalidRangeError,
    NotFoundError,
    StorageError,
)
from cloudckpt.format import CheckpointIndex, Chunk
from cloudckpt.format.chunks import overlapping
from cloudckpt.restoring.buffers import (
    ObjectSizes,
    ReadTarget,
    chunk_past_end,
)
from cloudckpt.storage import ReadRequest, Storage
from cloudckpt.storage.checksum import crc32c_of
from cloudckpt.storage.parts import Countdown


def _bytes_view(array: NDArray[Any]) -> memoryview:
    return array.reshape(-1).view(np.uint8).data


def _contiguous_in(start: Sequence[int], extent: Sequence[int], shape: Sequence[int]) -> tuple[int, int] | None:
    """``(first element, count)`` if the box ``start``/``extent`` is one contiguous run of a C-order ``shape``."""
    ndim = len(shape)
    for j in range(ndim + 1):
        if all(n == 1 for n in extent[:j]) and tuple(extent[j + 1:]) == tuple(shape[j + 1:]):
            first = int(np.ravel_multi_index(tuple(start), tuple(shape))) if ndim and math.prod(shape) else 0
            return first, math.prod(extent)
    return None


def _flat(index: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for i, n in zip(index, shape, strict=True):
        flat = flat * n + i
    return flat


#: A partial read of a chunk may fetch up to this many unneeded bytes (the gaps between
#: the rows it needs) to save requests; beyond it the read is split.
MAX_READ_WASTE = 1024 * 1024
#: Verify partial reads too: each read of part of a chunk is widened to the chunk's
#: checksum blocks (``Chunk.blocks``: 1 MiB blocks for large chunks, the whole chunk for
#: small ones) and every block read is checked. Off only to measure exact byte ranges.
VERIFY_PARTIAL_READS = True


def partial_reads(cshape: Sequence[int], start: Sequence[int], extent: Sequence[int],
                  itemsize: int) -> list[tuple[int, int, tuple[int, ...], tuple[int, ...]]]:
    """Byte ranges of a C-order chunk that cover its sub-box ``start``/``extent``.

    Returns ``(first element, element count, sub-box start, sub-box extent)`` per read:
    each read spans its sub-box from its first to its last element, wasting at most
    ``MAX_READ_WASTE`` bytes of gaps; larger sub-boxes are halved along their first
    dimension longer than one until they fit. (A sub-box whose rows are whole is
    contiguous and costs exactly its bytes.)
    """
    out: list[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = []
    stack = [(tuple(start), tuple(extent))]
    while stack:
        s, e = stack.pop()
        if math.prod(e) == 0:
            continue
        first = _flat(s, cshape)
        span = _flat([a + n - 1 for a, n in zip(s, e, strict=True)], cshape) - first + 1
        if (span - math.prod(e)) * itemsize <= MAX_READ_WASTE:
            out.append((first, span, s, e))
            continue
        d = next(i for i, n in enumerate(e) if n > 1)
        half = e[d] // 2
        upper = (s, (*e[:d], half, *e[d + 1:]))
        lower = ((*s[:d], s[d] + half, *s[d + 1:]), (*e[:d], e[d] - half, *e[d + 1:]))
        stack.extend((lower, upper))
    return out


class RangeReader(Protocol):
    """Fills read requests some other way than reading them here (``distributed.relay``)."""

    def read(self, storage: Storage, requests: Sequence[ReadRequest]) -> None: ...


def read_arrays(storage: Storage, index: CheckpointIndex, targets: Sequence[ReadTarget],
                ranges: RangeReader | None = None) -> None:
    """Fill every target from the data objects, in parallel ranged reads, and verify CRC32C.

    Only the chunks that overlap a target's box are fetched, and of a chunk only
    partly inside the box only the byte ranges covering that part, widened to the
    chunk's checksum blocks. A part that is one run in the chunk and in the box (whole
    rows: resharding along the first dimension) lands straight in the destination, and
    only the widening margins go through scratch buffers (under a block each); other
    parts (columns) are read into scratch and scattered. A range several targets need
    (many small new shards cut from one stored chunk; replicas a caller did not merge) is read once, verified once
    and copied to each. Every byte read is verified: whole chunks against their CRC32C,
    partial reads block by block (``VERIFY_PARTIAL_READS``) - on the pool, each as soon as
    its bytes have landed, overlapped with the reads still in flight.

    Raises:
        ChecksumError: a chunk's bytes do not match their recorded CRC32C (names the key
            and the object).
        CheckpointNotFoundError: a data object is gone (deleted while reading?).
        CheckpointFormatError: a data object is shorter than the index says.
    """
    requests: list[ReadRequest] = []
    landings: list[_Landing] = []
    written = _Written()

    def fetch(obj: str, offset: int, out: memoryview, steps: list[Callable[[], None]],
              fills: ReadTarget | None) -> None:
        """Read ``out`` from ``obj``; ``fills``: the target whose own memory ``out`` is (else scratch)."""
        landing = _Landing(steps, fills, written)
        landings.append(landing)
        requests.append(ReadRequest(obj, offset, out, landing))

    parts: dict[tuple[str, int, int], list[_Part]] = {}
    for target in targets:
        flat = _bytes_view(target.dest)
        chunks = target.entry.chunks
        if target.start is None and len(chunks) == 1 and chunks[0].length == flat.nbytes > 0 \
                and chunks[0].shape == target.dest.shape:  # the common case, one whole array: no geometry
            chunk = chunks[0]
            fetch(index.objects[chunk.object].name, chunk.offset, flat,
                  [partial(_verify, storage, index, target, chunk, 0, [flat], chunk.crc32c)], target)
            continue
        for part in _parts_of(index, target):
            parts.setdefault((part.obj, part.chunk.offset + part.begin, part.end - part.begin), []).append(part)

    for (obj, offset, size), group in parts.items():
        first = group[0]
        chunk, target = first.chunk, first.target
        whole = first.begin == 0 and first.end == chunk.length
        if len(group) == 1 and first.run is not None:  # one run in the chunk and in the destination: in place
            flat = _bytes_view(target.dest)
            into = flat[first.run[0] * first.itemsize:(first.run[0] + first.run[1]) * first.itemsize]
            segments = [(at, buffer) for at, buffer in (
                (first.begin, _bytes_view(np.empty(first.need_lo - first.begin, dtype=np.uint8))),
                (first.need_lo, into),
                (first.need_hi, _bytes_view(np.empty(first.end - first.need_hi, dtype=np.uint8)))) if buffer.nbytes]
            check = _check(storage, index, target, chunk, segments, whole)
            if len(segments) == 1:
                fetch(obj, offset, into, check, target)
                continue
            joint = Countdown(partial(_in_turn, check), len(segments))  # verify once all segments landed
            for at, buffer in segments:  # adjacent: read_into fetches them in one GET
                fetch(obj, chunk.offset + at, buffer, [joint], target if buffer is into else None)
            continue
        # Scratch: a part that is no single run, or a range several targets need (many small new
        # shards cut from one stored chunk): read once, verify once, copy to each.
        raw = np.empty(size, dtype=np.uint8)
        steps = _check(storage, index, target, chunk, [(first.begin, _bytes_view(raw))], whole)
        for part in group:
            temp = raw[part.need_lo - part.begin:part.need_hi - part.begin].view(part.target.dest.dtype)
            values = np.lib.stride_tricks.as_strided(temp, shape=part.extent, strides=part.strides, writeable=False)
            box = tuple(slice(a, a + n) for a, n in zip(part.at, part.extent, strict=True))
            steps.append(partial(_scatter, written, part.target, box, values))
        fetch(obj, offset, _bytes_view(raw), steps, None)
    try:
        (ranges.read if ranges is not None else read_coalesced)(storage, requests)
        for landing in landings:  # what a range reader filled without running ``done`` (the relay)
            if not landing.ran:
                landing()
    except ChecksumError as exc:
        overwritten = written.paths()
        raise ChecksumError(f"{exc}{_partial_note(overwritten, targets)}", exc.url, key=exc.key,
                            overwritten=overwritten) from exc
    except NotFoundError as exc:
        raise CheckpointNotFoundError(
            f"a data object of checkpoint {storage.url_for(index.name)!r} is missing (deleted while "
            f"reading?): {exc}{_partial_note(written.paths(), targets)}",
            storage.url_for(index.name)) from exc
    except InvalidRangeError as exc:
        short = _short_read(storage, index, targets) if ranges is None else None
        raise CheckpointFormatError(
            f"a data object of checkpoint {storage.url_for(index.name)!r} is shorter than its index "
            f"says (truncated?): {short or exc}{_partial_note(written.paths(), targets)}") from exc
    except StorageError as exc:
        overwritten = written.paths()
        if overwritten:
            raise type(exc)(f"{exc}{_partial_note(overwritten, targets)}", exc.url) from exc
        raise


def _short_read(storage: Storage, index: CheckpointIndex, targets: Sequence[ReadTarget]) -> str | None:
    """Which bytes a read that ran short missed, by key, with the object's real size (one HEAD per object).

    The store's own error speaks of the coalesced span it was reading, which may start well
    after the object's real end; this names the array and its chunk's bytes. ``None`` if the
    objects now hold every byte (replaced while reading) or cannot be HEADed.
    """
    sizes = ObjectSizes(storage)
    try:
        for target in targets:
            extent = target.dest.shape
            chunks = overlapping(target.entry.chunks, target.start or (0,) * len(extent), extent)
            problem = chunk_past_end(index, chunks, sizes)
            if problem is not None:
                return f"{target.path!r}: {problem}"
    except StorageError:
        return None
    return None


class _Landing:
    """What happens to one request's bytes once they have landed: verify, then scatter.

    It is the request's ``done``, so it runs on the pool thread that read the last byte
    (the CRC32C releases the GIL: chunks are verified in parallel, overlapped with the
    reads still in flight); ``read_arrays`` runs any that a range reader left out.
    """

    __slots__ = ("_fills", "_steps", "_written", "ran")

    def __init__(self, steps: list[Callable[[], None]], fills: ReadTarget | None, written: _Written) -> None:
        self._steps = steps
        self._fills = fills  # the target whose own memory the bytes landed in (None: scratch)
        self._written = written
        self.ran = False

    def __call__(self) -> None:
        if self._fills is not None:
            self._written.add(self._fills)  # its bytes are in the destination (verified or not)
        _in_turn(self._steps)
        self.ran = True


class _Written:
    """Key paths of the targets a restore has started writing into (what a failure reports)."""

    def __init__(self) -> None:
        self._paths: set[str] = set()
        self._lock = threading.Lock()

    def add(self, target: ReadTarget) -> None:
        if target.live:
            with self._lock:
                self._paths.add(target.path)

    def paths(self) -> tuple[str, ...]:
        """Key paths of the live targets some of whose bytes have landed, sorted."""
        with self._lock:
            return tuple(sorted(self._paths))


def _in_turn(steps: Sequence[Callable[[], None]]) -> None:
    for step in steps:
        step()


def _scatter(written: _Written, target: ReadTarget, box: tuple[slice, ...], values: NDArray[Any]) -> None:
    written.add(target)
    target.dest[box] = values


@dataclass(frozen=True, slots=True)
class _Part:
    """Part of a stored chunk that one target needs: a sub-box, and the bytes that cover it.

    ``[need_lo, need_hi)`` are the chunk bytes from the sub-box's first to last element;
    ``[begin, end)`` the same widened to whole checksum blocks (what is read and verified).
    ``run`` is ``(first element, count)`` in the target when the sub-box is one run both in
    the chunk and in the target (then it can be read in place).
    """

    target: ReadTarget
    chunk: Chunk
    obj: str
    need_lo: int
    need_hi: int
    begin: int
    end: int
    at: tuple[int, ...]
    extent: tuple[int, ...]
    run: tuple[int, int] | None

    @property
    def itemsize(self) -> int:
        return int(self.target.dest.dtype.itemsize)

    @property
    def strides(self) -> tuple[int, ...]:
        """Byte strides of the stored chunk (C order): how its sub-box is viewed in a scratch copy."""
        shape = self.chunk.shape
        return tuple(math.prod(shape[i + 1:]) * self.itemsize for i in range(len(shape)))


def _parts_of(index: CheckpointIndex, target: ReadTarget) -> Iterator[_Part]:
    """The parts of stored chunks that fill ``target`` (a grid bisects: no scan of every shard)."""
    itemsize = target.dest.dtype.itemsize
    shape = tuple(target.dest.shape)
    origin = target.start if target.start is not None else (0,) * len(shape)
    for chunk in overlapping(target.entry.chunks, origin, shape):
        if chunk.length == 0:
            continue
        lo = [max(c, o) for c, o in zip(chunk.start, origin, strict=True)]
        hi = [min(c + n, o + m) for c, n, o, m in zip(chunk.start, chunk.shape, origin, shape, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        extent = tuple(h - low for low, h in zip(lo, hi, strict=True))
        in_dest = tuple(low - o for low, o in zip(lo, origin, strict=True))
        obj = index.objects[chunk.object].name
        if extent == chunk.shape:
            yield _Part(target, chunk, obj, 0, chunk.length, 0, chunk.length, in_dest, extent,
                        _contiguous_in(in_dest, extent, shape))
            continue
        in_chunk = tuple(low - c for low, c in zip(lo, chunk.start, strict=True))
        for first, count, sub_start, sub_extent in partial_reads(chunk.shape, in_chunk, extent, itemsize):
            need_lo, need_hi = first * itemsize, (first + count) * itemsize
            begin, end = _widen(chunk, need_lo, need_hi) if VERIFY_PARTIAL_READS else (need_lo, need_hi)
            at = tuple(a - c + d for a, c, d in zip(sub_start, in_chunk, in_dest, strict=True))
            run = _contiguous_in(at, sub_extent, shape) if count == math.prod(sub_extent) else None
            yield _Part(target, chunk, obj, need_lo, need_hi, begin, end, at, sub_extent, run)


def _check(storage: Storage, index: CheckpointIndex, target: ReadTarget, chunk: Chunk,
           segments: Sequence[tuple[int, memoryview]], whole: bool) -> list[Callable[[], None]]:
    """The verification of a read: a whole chunk against its CRC32C, part of one block by block."""
    if whole:
        return [partial(_verify, storage, index, target, chunk, 0, [b for _, b in segments], chunk.crc32c)]
    return [partial(_verify_blocks, storage, index, target, chunk, segments)] if VERIFY_PARTIAL_READS else []


def _verify_blocks(storage: Storage, index: CheckpointIndex, target: ReadTarget, chunk: Chunk,
                   segments: Sequence[tuple[int, memoryview]]) -> None:
    """Verify chunk bytes widened to whole blocks, block by block.

    ``segments`` are ``(offset in the chunk, bytes)`` back to back: one buffer, or the
    destination's own run between the two margins that complete its first and last blocks.
    """
    unit, crcs = chunk.blocks()
    begin, end = segments[0][0], segments[-1][0] + segments[-1][1].nbytes
    for lo in range(begin, end, unit):
        hi = min(lo + unit, end)
        pieces = [buffer[max(lo, offset) - offset:min(hi, offset + buffer.nbytes) - offset]
                  for offset, buffer in segments if offset < hi and offset + buffer.nbytes > lo]
        _verify(storage, index, target, chunk, lo, pieces, crcs[lo // unit])


def _widen(chunk: Chunk, lo: int, hi: int) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` of a chunk widened to whole checksum blocks, so they can be verified."""
    unit, _ = chunk.blocks()
    return lo // unit * unit, min(-(-hi // unit) * unit, chunk.length)


def _verify(storage: Storage, index: CheckpointIndex, target: ReadTarget, chunk: Chunk, start: int,
            data: Sequence[memoryview], expected: int) -> None:
    """Raise ``ChecksumError`` unless ``data`` (chunk bytes from ``start``, back to back) has CRC32C ``expected``."""
    actual = crc32c_of(data)
    if actual != expected:
        obj = storage.url_for(index.objects[chunk.object].name)
        first = chunk.offset + start
        raise ChecksumError(
            f"checksum mismatch for {target.path!r} in {obj} bytes [{first}, {first + sum(d.nbytes for d in data)}): "
            f"recorded CRC32C {expected:08x}, read {actual:08x}", obj, key=target.path)


def read_coalesced(storage: Storage, requests: Sequence[ReadRequest]) -> None:
    """``storage.read_into``: it reads runs of adjacent requests together (a few GETs for
    hundreds of small arrays) straight into their buffers, and runs each ``done`` as it lands."""
    storage.read_into(requests)


def _partial_note(written: Sequence[str], targets: Sequence[ReadTarget]) -> str:
    """What a failed in-place restore left: exactly which live values it had overwritten."""
    if not any(t.live for t in targets):
        return ""  # a read into fresh buffers (export, load_variable): no live object to speak of
    if not written:
        return " - no live object was written: they hold what they held before"
    live = sorted({t.path for t in targets if t.live})
    shown = ", ".join(repr(p) for p in written[:8]) + (f" and {len(written) - 8} more" if len(written) > 8 else "")
    return (f" - the live state is now partial: this restore had already written {len(written)} of the "
            f"{len(live)} values it restores in place ({shown}); the others keep what they held (unless a "
            "read failed mid-way). Restore an intact checkpoint - CheckpointManager.restore_or_initialize() "
            "falls back to the newest one by itself")
