"""What a restore reads into: destination buffers, and the size checks before allocating one.

A ``ReadTarget`` is one array (or one box of it) to fill; ``new_buffer`` makes a fresh
destination; ``backed_buffer`` does so only after the real data objects were seen to hold
the bytes an untrusted index claims (``ObjectSizes`` HEADs each object once). The reads
themselves are ``array_reads``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import (
    CheckpointFormatError,
)
from cloudckpt.format import ArrayEntry, CheckpointIndex, Chunk, parse_dtype
from cloudckpt.storage import Storage


@dataclass(frozen=True, slots=True)
class ReadTarget:
    """One array (or one box of it) to fill; ``dest`` is C-contiguous with the entry's dtype.

    ``start`` is where ``dest`` sits in the global array (``None``: at the origin, and
    ``dest`` has the entry's whole shape). A sharded restore passes each local shard's
    box: only the bytes inside it are fetched.

    ``live`` marks memory the user's objects own (an in-place restore): a failure after
    bytes started arriving leaves it partly written, and the error says so.
    """

    path: str
    entry: ArrayEntry
    dest: NDArray[Any]
    live: bool
    start: tuple[int, ...] | None = None


#: Where every fresh destination starts: a multiple of this many bytes (a cache line, and what
#: XLA's CPU client needs to alias host memory instead of copying it).
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any], alignment: int = ALIGNMENT) -> NDArray[Any]:
    """An uninitialised C-contiguous array whose first byte sits at a multiple of ``alignment``.

    Why: numpy's large allocations land 16 bytes past a 64-byte boundary, and jax's CPU
    ``device_put`` copies a buffer that is not 64-byte aligned instead of aliasing it, so a
    JAX restore held the state twice. Over-allocating by ``alignment`` bytes and slicing costs
    nothing else.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    skip = -raw.ctypes.data % alignment
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def new_buffer(entry: ArrayEntry, shape: tuple[int, ...] | None = None) -> NDArray[Any]:
    """A fresh destination for ``entry`` or a box of it (uninitialised: every byte will be read), 64-byte aligned."""
    return aligned_empty(entry.shape if shape is None else shape, parse_dtype(entry.dtype))


#: A buffer the index alone sizes (no live object of that size exists) above this many bytes is
#: allocated only after HEADs showed the objects holding its bytes really are that large.
CHECK_BEFORE_ALLOCATING = 16 * 1024 * 1024


class ObjectSizes:
    """The real sizes of a checkpoint's data objects, HEADed once each (``backed_buffer`` asks).

    Why: an index is untrusted, and one that describes terabytes in a small object (its
    recorded sizes lie too) would make a reader die allocating, with an untyped MemoryError.
    """

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def of(self, key: str) -> int:
        with self._lock:
            known = self._sizes.get(key)
        if known is None:
            known = self._storage.head(key).size
            with self._lock:
                self._sizes[key] = known
        return known


def chunk_past_end(index: CheckpointIndex, chunks: Iterable[Chunk], sizes: ObjectSizes) -> str | None:
    """Why one of an array's ``chunks`` cannot be read - it lies past the real end of its object - or ``None``.

    The one size check of the read path: before an index-sized allocation
    (``backed_buffer``), and to say exactly which bytes are missing when a read ran short.
    """
    for chunk in chunks:
        obj = index.objects[chunk.object].name
        real = sizes.of(obj)
        if chunk.offset + chunk.length > real:
            return (f"the index puts {chunk.length} of its bytes at [{chunk.offset}, "
                    f"{chunk.offset + chunk.length}) of {obj}, which has {real} bytes")
    return None


def backed_buffer(index: CheckpointIndex, path: str, entry: ArrayEntry, sizes: ObjectSizes | None) -> NDArray[Any]:
    """``new_buffer(entry)``, refusing first an entry whose bytes the real objects cannot hold.

    Raises:
        CheckpointFormatError: a chunk of ``path`` lies past the real end of its object
            (nothing was allocated). ``sizes`` ``None``: not checked (reads go elsewhere).
    """
    if sizes is not None and math.prod(entry.shape) * parse_dtype(entry.dtype).itemsize > CHECK_BEFORE_ALLOCATING:
        problem = chunk_past_end(index, entry.chunks, sizes)
        if problem is not None:
            raise CheckpointFormatError(
                f"cannot read {path!r}: {problem} (a damaged or hostile index); nothing was allocated for its "
                f"{math.prod(entry.shape)} elements")
    return new_buffer(entry)
