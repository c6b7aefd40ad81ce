"""Where an array's bytes live: one ``Chunk`` per stored box, or a ``ChunkGrid`` for many.

A sharded array is stored as one chunk per distinct shard. Written as one JSON object per
chunk (offsets and shape lists each), a 4,096-host checkpoint of 1,000 arrays is 4 million
such objects - hundreds of MB of index and GBs of Python objects per host that reads it. But
shards that follow a ``Layout`` over a ``Mesh`` (DTensor ``Shard``/``Replicate``, the normal
case) form a *grid*: per dimension a sorted list of split points, every cell one chunk. A
``ChunkGrid`` records the splits once and the rest as columns (object number, offset,
CRC32C, block CRCs, content hash) in numpy arrays, ~32 bytes per chunk in memory and ~45 in
the index (base64), and is a ``Sequence[Chunk]`` to every reader. By construction its cells
are disjoint and cover the array, so validation is arithmetic on the columns (linear,
vectorized), and the chunks a box overlaps are found by bisecting the splits - not by
testing every chunk.

Irregular layouts keep the per-chunk form (``Chunk``, validated by ``boxes.partition_problem``).
"""

from __future__ import annotations

import base64
import bisect
import itertools
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

#: From this many chunks an array is written as a grid (when its chunks form one); fewer stay
#: one JSON object each, readable at a glance.
GRID_MIN_CHUNKS = 64
#: Hard bound on a grid's cells (the per-chunk form allows 2^16): a hostile index must not
#: make a reader allocate columns for more.
MAX_GRID_CHUNKS = 1 << 24
_HASH_TAG = "xxh3_128:"
#: The format version from which a per-chunk ``blocks.crc32c`` is little-endian. Versions 1 and 2
#: wrote it big-endian while a grid's ``blocks.crc32c`` (like all its columns) was little-endian:
#: one field, two byte orders. Little-endian won because it is what the grid's numpy columns already
#: are (native on x86-64 and aarch64: no byteswap of millions of values, and grids are unchanged),
#: and what the data objects use; for a chunk list either order is one ``struct`` call.
BLOCKS_LITTLE_ENDIAN_SINCE = 3


def pack_block_crcs(crcs: Sequence[int]) -> bytes:
    """A chunk's block CRC32Cs as the bytes the current format writes: little-endian uint32s."""
    return struct.pack(f"<{len(crcs)}I", *crcs)


def unpack_block_crcs(packed: bytes, version: int) -> tuple[int, ...]:
    """A chunk's block CRC32Cs from an index of format ``version``: big-endian before version 3.

    ``len(packed)`` must be a multiple of 4 (the caller checks the count).
    """
    order = "<" if version >= BLOCKS_LITTLE_ENDIAN_SINCE else ">"
    return struct.unpack(f"{order}{len(packed) // 4}I", packed)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Where one chunk of an array's bytes lives.

    Unsharded arrays have one chunk covering the whole array (``start`` all zeros,
    ``shape`` = the global shape); sharded arrays one chunk per shard, each with its
    offsets into the global array.
    """

    object: int
    offset: int
    length: int
    crc32c: int
    start: tuple[int, ...]
    shape: tuple[int, ...]
    #: CRC32C of each ``block_size`` bytes of the chunk (the last block may be shorter);
    #: empty for a chunk that fits in one block (its ``crc32c`` covers it) and in indexes
    #: written before blocks were recorded.
    block_size: int = 0
    block_crc32c: tuple[int, ...] = ()
    #: The bytes' strong content hash (``format.CONTENT_HASH``; version 2): what an incremental
    #: save compares to reuse these bytes instead of uploading them again. ``None`` in version 1.
    hash: str | None = None

    def blocks(self) -> tuple[int, tuple[int, ...]]:
        """``(unit, CRC32C per unit)``: the pieces a partial read can be verified in."""
        if self.block_crc32c:
            return self.block_size, self.block_crc32c
        return max(self.length, 1), (self.crc32c,)


class ChunkGrid(Sequence[Chunk]):
    """The chunks of an array whose boxes form a grid, as columns (see the module docs).

    Cells are in C order of the grid: chunk ``i`` is cell ``np.unravel_index(i, counts)``.
    """

    __slots__ = ("_blocks", "_extents", "block_size", "counts", "crc32c", "hashes", "itemsize", "objects",
                 "offsets", "shape", "splits")

    def __init__(self, shape: tuple[int, ...], itemsize: int, splits: tuple[tuple[int, ...], ...],
                 objects: NDArray[np.int64], offsets: NDArray[np.int64], crc32c: NDArray[np.uint32],
                 block_size: int, block_crc32c: NDArray[np.uint32], hashes: bytes | None) -> None:
        self.shape = shape
        self.itemsize = itemsize
        self.splits = splits
        self.counts = tuple(len(s) for s in splits)
        self._extents = tuple(np.diff(np.array([*s, dim], dtype=np.int64)) for s, dim in zip(splits, shape,
                                                                                             strict=True))
        self.objects = objects
        self.offsets = offsets
        self.crc32c = crc32c
        self.block_size = block_size
        self.hashes = hashes
        lengths = self.lengths()
        per_chunk = np.where(lengths > block_size, -(-lengths // max(block_size, 1)), 0) if block_size else \
            np.zeros(len(lengths), dtype=np.int64)
        self._blocks = (np.concatenate([[0], np.cumsum(per_chunk)]).astype(np.int64), block_crc32c)

    # ------------------------------------------------------------------ Sequence
    def __len__(self) -> int:
        return len(self.objects)

    @overload
    def __getitem__(self, i: int) -> Chunk: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Chunk]: ...

    def __getitem__(self, i: int | slice) -> Chunk | Sequence[Chunk]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        cell = np.unravel_index(i, self.counts) if self.counts else ()
        start = tuple(int(self.splits[d][c]) for d, c in enumerate(cell))
        extent = tuple(int(self._extents[d][c]) for d, c in enumerate(cell))
        length = math.prod(extent) * self.itemsize
        first, last = int(self._blocks[0][i]), int(self._blocks[0][i + 1])
        blocks = tuple(int(b) for b in self._blocks[1][first:last])
        digest = None if self.hashes is None else _HASH_TAG + self.hashes[16 * i:16 * i + 16].hex()
        return Chunk(int(self.objects[i]), int(self.offsets[i]), length, int(self.crc32c[i]), start, extent,
                     self.block_size if blocks else 0, blocks, digest)

    def __iter__(self) -> Iterator[Chunk]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkGrid):
            return (self.shape == other.shape and self.splits == other.splits and self.itemsize == other.itemsize
                    and np.array_equal(self.objects, other.objects) and np.array_equal(self.offsets, other.offsets)
                    and np.array_equal(self.crc32c, other.crc32c) and self.hashes == other.hashes
                    and self.block_size == other.block_size and np.array_equal(self._blocks[1], other._blocks[1]))
        if isinstance(other, Sequence):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.shape, self.splits, self.crc32c.tobytes()))

    def __repr__(self) -> str:
        return f"ChunkGrid(shape={self.shape}, counts={self.counts}, chunks={len(self)})"

    # ------------------------------------------------------------------ columns
    def lengths(self) -> NDArray[np.int64]:
        """Each chunk's length in bytes (cell element count x itemsize), in chunk order."""
        cells: NDArray[np.int64] = np.ones(1, dtype=np.int64)
        for extent in self._extents:
            cells = np.multiply.outer(cells, extent).reshape(-1)
        return (cells * self.itemsize).astype(np.int64)

    def moved(self, offsets: NDArray[np.int64]) -> ChunkGrid:
        """The same chunks at other offsets of their objects (a copy that repacks those objects).

        CRC32Cs, block CRCs and content hashes cover each chunk's own bytes, so they stay as they are.
        """
        if offsets.shape != self.offsets.shape:
            raise ValueError(f"{offsets.shape[0] if offsets.ndim else 0} offsets for {len(self)} chunks")
        return ChunkGrid(self.shape, self.itemsize, self.splits, self.objects, offsets.astype(np.int64),
                         self.crc32c, self.block_size, self._blocks[1], self.hashes)

    def overlapping(self, start: Sequence[int], extent: Sequence[int]) -> list[int]:
        """Indices of the chunks that overlap the box ``start``/``extent`` (bisecting the splits)."""
        ranges = []
        for splits, lo, n in zip(self.splits, start, extent, strict=True):
            if n <= 0:
                return []
            first = bisect.bisect_right(splits, lo) - 1
            last = bisect.bisect_left(splits, lo + n) - 1
            ranges.append(range(max(first, 0), last + 1))
        if not ranges:
            return [0] if len(self) else []
        grid = np.ravel_multi_index(np.meshgrid(*[np.array(r) for r in ranges], indexing="ij"), self.counts)
        return [int(i) for i in np.asarray(grid).reshape(-1)]


def overlapping(chunks: Sequence[Chunk], start: Sequence[int], extent: Sequence[int]) -> Iterator[Chunk]:
    """The chunks that overlap a box: bisected in a ``ChunkGrid``, tested one by one otherwise."""
    if isinstance(chunks, ChunkGrid):
        return (chunks[i] for i in chunks.overlapping(start, extent))
    return (c for c in chunks if all(max(a, s) < min(a + m, s + n) for a, m, s, n in
                                     zip(c.start, c.shape, start, extent, strict=True)) or not c.shape)


# ---------------------------------------------------------------------- writing a grid
def as_grid(shape: tuple[int, ...], itemsize: int, chunks: Sequence[Chunk]) -> ChunkGrid | None:
    """The chunks as a ``ChunkGrid`` when they are many and form a full grid of ``shape``, else ``None``."""
    if len(chunks) < GRID_MIN_CHUNKS or len(chunks) > MAX_GRID_CHUNKS or not shape or 0 in shape:
        return None
    splits = tuple(tuple(sorted({c.start[d] for c in chunks})) for d in range(len(shape)))
    counts = tuple(len(s) for s in splits)
    if math.prod(counts) != len(chunks) or any(s[0] != 0 for s in splits):
        return None
    position = [{v: k for k, v in enumerate(s)} for s in splits]
    extents = [np.diff(np.array([*s, dim])) for s, dim in zip(splits, shape, strict=True)]
    ordered: list[Chunk | None] = [None] * len(chunks)
    for c in chunks:
        cell = tuple(position[d][c.start[d]] for d in range(len(shape)))
        if any(c.shape[d] != extents[d][cell[d]] for d in range(len(shape))):
            return None
        i = int(np.ravel_multi_index(cell, counts))
        if ordered[i] is not None:
            return None
        ordered[i] = c
    cells = [c for c in ordered if c is not None]
    block_sizes = {c.block_size for c in cells if c.block_crc32c}
    hashes = [c.hash for c in cells]
    if len(cells) != len(chunks) or len(block_sizes) > 1 or (None in hashes and any(hashes)):
        return None
    block_size = block_sizes.pop() if block_sizes else 0
    grid = ChunkGrid(shape, itemsize, splits, np.array([c.object for c in cells], dtype=np.int64),
                     np.array([c.offset for c in cells], dtype=np.int64),
                     np.array([c.crc32c for c in cells], dtype=np.uint32), block_size,
                     np.array([b for c in cells for b in c.block_crc32c], dtype=np.uint32),
                     None if hashes[0] is None else b"".join(bytes.fromhex(h[len(_HASH_TAG):])
                                                             for h in hashes if h is not None))
    return grid if list(grid) == cells else None  # blocks that a grid cannot carry (a small chunk with some)


def grid_to_json(grid: ChunkGrid) -> dict[str, Any]:
    """The index form of a grid: the splits, then the columns as base64 little-endian integers.

    ``blocks.crc32c`` is little-endian in every version (a chunk list's was big-endian before version 3).
    """
    out: dict[str, Any] = {
        "splits": [list(s) for s in grid.splits],
        "object": _b64(grid.objects.astype("<u4")),
        "offset": _b64(grid.offsets.astype("<u8")),
        "crc32c": _b64(grid.crc32c.astype("<u4")),
    }
    if grid.block_size:
        out["blocks"] = {"size": grid.block_size, "crc32c": _b64(grid._blocks[1].astype("<u4"))}
    if grid.hashes is not None:
        out["hash"] = base64.b64encode(grid.hashes).decode("ascii")
    return out


def _b64(array: NDArray[Any]) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


# ---------------------------------------------------------------------- reading a grid
def grid_from_json(doc: Any, shape: tuple[int, ...], itemsize: int, object_sizes: Sequence[int],
                   fail: Callable[[str], Exception]) -> ChunkGrid:
    """Parse and validate a grid (version 2): linear in its size, vectorized, no per-chunk Python work.

    Raises:
        what ``fail(problem)`` returns: anything malformed, out of bounds or inconsistent.
    """
    if not isinstance(doc, dict):
        raise fail("a grid must be an object")
    known = {"splits", "object", "offset", "crc32c", "blocks", "hash"}
    if set(doc) - known or not {"splits", "object", "offset", "crc32c"} <= set(doc):
        raise fail(f"grid fields must be {sorted(known)} (blocks and hash optional), got {sorted(doc)}")
    raw_splits = doc["splits"]
    if not isinstance(raw_splits, list) or len(raw_splits) != len(shape) or not shape:
        raise fail(f"grid needs one list of split points per dimension of {shape}")
    splits = []
    for d, (points, dim) in enumerate(zip(raw_splits, shape, strict=True)):
        if (not isinstance(points, list) or not points or len(points) > MAX_GRID_CHUNKS
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in points)):
            raise fail(f"grid splits of dimension {d} must be a non-empty list of integers")
        if points[0] != 0 or any(b <= a for a, b in itertools.pairwise(points)) or points[-1] >= dim:
            raise fail(f"grid splits of dimension {d} must rise strictly from 0 and stay below {dim}")
        splits.append(tuple(points))
    count = math.prod(len(s) for s in splits)
    if count > MAX_GRID_CHUNKS:
        raise fail(f"grid of {count} chunks exceeds {MAX_GRID_CHUNKS}")
    objects = _column(doc["object"], "<u4", count, "object", fail).astype(np.int64)
    offsets = _column(doc["offset"], "<u8", count, "offset", fail)
    if offsets.size and int(offsets.max()) > 2**53:
        raise fail("a grid offset is absurdly large")
    offsets = offsets.astype(np.int64)
    crcs = _column(doc["crc32c"], "<u4", count, "crc32c", fail).astype(np.uint32)
    if objects.size and int(objects.max()) >= len(object_sizes):
        raise fail(f"a grid chunk names object {int(objects.max())} of {len(object_sizes)}")
    hashes = None
    if "hash" in doc:
        hashes = _bytes(doc["hash"], "hash", fail)
        if len(hashes) != 16 * count:
            raise fail(f"{len(hashes) // 16} grid hashes for {count} chunks")
    block_size, blocks = 0, np.zeros(0, dtype=np.uint32)
    if "blocks" in doc:
        raw = doc["blocks"]
        if not isinstance(raw, dict) or set(raw) != {"size", "crc32c"} or not isinstance(raw["size"], int) \
                or isinstance(raw["size"], bool) or not 4096 <= raw["size"] <= 2**30 or raw["size"] % 16:
            raise fail("grid blocks must be {size: a multiple of 16 in [4096, 2^30], crc32c: base64}")
        block_size = raw["size"]
        packed = _bytes(raw["crc32c"], "blocks.crc32c", fail)
        if len(packed) % 4:
            raise fail("grid block checksums are not whole uint32s")
        blocks = np.frombuffer(packed, dtype="<u4").astype(np.uint32)
    grid = ChunkGrid(shape, itemsize, tuple(splits), objects, offsets, crcs, block_size, blocks, hashes)
    if int(grid._blocks[0][-1]) != len(blocks):
        raise fail(f"{len(blocks)} grid block checksums for {int(grid._blocks[0][-1])} blocks")
    ends = offsets + grid.lengths()
    sizes = np.asarray(object_sizes, dtype=np.int64)
    past: NDArray[np.intp] = np.nonzero(ends > sizes[objects])[0]
    if len(past):
        i = int(past[0])
        raise fail(f"grid chunk {i} runs past the end of its object (bytes [{int(offsets[i])}, {int(ends[i])}) of "
                   f"{int(sizes[objects[i]])})")
    return grid


def _bytes(raw: Any, what: str, fail: Callable[[str], Exception]) -> bytes:
    if not isinstance(raw, str):
        raise fail(f"grid {what} must be a base64 string")
    try:
        return base64.b64decode(raw, validate=True)
    except (ValueError, TypeError):
        raise fail(f"grid {what} is not base64") from None


def _column(raw: Any, dtype: str, count: int, what: str, fail: Callable[[str], Exception]) -> NDArray[Any]:
    data = _bytes(raw, what, fail)
    width = np.dtype(dtype).itemsize
    if len(data) != width * count:
        raise fail(f"grid {what} holds {len(data) // width} values for {count} chunks")
    return np.frombuffer(data, dtype=dtype)
