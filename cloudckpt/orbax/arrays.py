"""One Orbax array: its zarr metadata validated, its chunks checked present, its values read by tensorstore.

Orbax stores each array leaf as a zarr array (v2 ``.zarray`` by default in 0.12, v3
``zarr.json`` with ``use_zarr3``) under the key prefix ``<param>/`` of the OCDBT kvstore.
The metadata is untrusted: it is fetched with a bounded byte range and its shape, chunk
shape and dtype are checked here - rank, non-negative sizes, a total under the format's
limit - before tensorstore opens the array. An array above ``CHECK_BEFORE_ALLOCATING`` is
read only after a listing showed every chunk of its grid stored (a metadata object that
claims terabytes over a few bytes of data is refused before anything is allocated; what
this cannot catch is one chunk whose zstd frame inflates beyond its own declared chunk -
tensorstore bounds that by the chunk shape, so a read never exceeds the checked total).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format.dtypes import parse_dtype
from cloudckpt.format.entries import MAX_BYTES, MAX_NDIM
from cloudckpt.restoring.buffers import CHECK_BEFORE_ALLOCATING

#: Largest zarr metadata object read (a real one is ~200-600 bytes).
MAX_ZARR_METADATA = 1 << 20
MAX_CHUNKS = 1 << 24


@dataclass(frozen=True, slots=True)
class ArrayMeta:
    """What an array's zarr metadata says, validated."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunks: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def chunk_count(self) -> int:
        return math.prod(-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True)) if self.shape else 1


def metadata_key(zarr3: bool) -> str:
    """The metadata object's name under an array's prefix."""
    return "zarr.json" if zarr3 else ".zarray"


def _ints(value: Any, what: str, where: str, minimum: int) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) > MAX_NDIM
            or not all(isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= MAX_BYTES for v in value)):
        raise CheckpointFormatError(
            f"{where}: {what} {value!r} is not a list of at most {MAX_NDIM} integers >= {minimum}")
    return tuple(value)


def parse_metadata(data: bytes, zarr3: bool, where: str) -> ArrayMeta:
    """Validate zarr metadata bytes; ``where`` names the array in errors."""
    if len(data) > MAX_ZARR_METADATA:
        raise CheckpointFormatError(f"{where}: zarr metadata over {MAX_ZARR_METADATA} bytes")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointFormatError(f"{where}: zarr metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{where}: zarr metadata is not a JSON object")
    shape = _ints(meta.get("shape"), "shape", where, 0)
    if zarr3:
        grid = meta.get("chunk_grid")
        config = grid.get("configuration") if isinstance(grid, dict) else None
        chunk_value = config.get("chunk_shape") if isinstance(config, dict) else None
        dtype_name = meta.get("data_type")
    else:
        chunk_value, dtype_name = meta.get("chunks"), meta.get("dtype")
    chunks = _ints(chunk_value, "chunk shape", where, 1)
    if len(chunks) != len(shape):
        raise CheckpointFormatError(f"{where}: chunk shape {chunks} does not match shape {shape}")
    try:
        dtype = parse_dtype(dtype_name)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{where}: {exc}") from None
    found = ArrayMeta(shape, dtype, chunks)
    if math.prod(shape) > MAX_BYTES // dtype.itemsize:
        raise CheckpointFormatError(f"{where}: shape {shape} of {dtype} is over {MAX_BYTES} bytes")
    if found.chunk_count > MAX_CHUNKS:
        raise CheckpointFormatError(f"{where}: {found.chunk_count} chunks, over the limit of {MAX_CHUNKS}")
    return found


def needs_chunk_check(meta: ArrayMeta, all_chunks_stored: bool) -> bool:
    """Whether an array's chunk grid is checked stored before it is read (one listing of its prefix)."""
    return meta.nbytes > CHECK_BEFORE_ALLOCATING or (all_chunks_stored and meta.nbytes > 0)


def check_chunks_stored(meta: ArrayMeta, keys: list[bytes], zarr3: bool, where: str) -> None:
    """Refuse an array whose chunk grid is not fully stored (listing ``keys`` under its prefix).

    Why: Orbax writes every chunk (``store_array_data_equal_to_fill_value``, its default): a
    missing one is damage that tensorstore would silently read as zeros (the fill value). And
    an array that claims more chunks than are stored is damaged or hostile: reading it would
    allocate its whole claimed size - so large arrays are checked even without that flag.
    """
    stored = sum(1 for key in keys if key not in (b".zarray", b".zattrs", b"zarr.json"))
    if zarr3:
        # sharding_indexed: each stored key is one shard (a chunk of the outer grid), ``c/i/j``.
        stored = sum(1 for key in keys if key == b"c" or key.startswith(b"c/"))
    if stored < meta.chunk_count:
        raise CheckpointFormatError(
            f"{where}: its metadata claims {meta.chunk_count} chunks ({meta.nbytes} bytes of {meta.dtype}), "
            f"but {stored} are stored - damaged or hostile; nothing was allocated")
