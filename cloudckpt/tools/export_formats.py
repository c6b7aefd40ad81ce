"""The two files ``export`` writes: .npz (numpy's zip of .npy members) and .safetensors.

``.npz``: numpy cannot name ml_dtypes types (bfloat16, float8, int4 ...; ``np.save`` would
write them as opaque ``V2``), so they are widened losslessly: floats to float32, int2/int4
to int8, uint2/uint4 to uint8. ``.safetensors`` is written directly (a JSON header and raw
bytes, no dependency needed); it keeps bfloat16 and float8.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.format import ValueEntry

#: numpy dtype name -> safetensors dtype.
SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
    "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64",
    "int64": "I64", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def _npz_dtype(array: NDArray[Any]) -> NDArray[Any]:
    """Widen ml_dtypes arrays to a dtype numpy (and every npz reader) knows; exact for all of them."""
    if array.dtype.kind != "V":
        return array
    name = array.dtype.name
    if name.startswith("uint"):
        return array.astype(np.uint8)
    if name.startswith("int"):
        return array.astype(np.int8)
    return array.astype(np.float32)


def write_npz(out: IO[bytes], arrays: Iterator[tuple[str, NDArray[Any]]],
               values: Sequence[tuple[str, ValueEntry]]) -> None:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path, array in arrays:
            with archive.open(path + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, _npz_dtype(array), allow_pickle=False)
        for path, entry in values:
            with archive.open(path + ".npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(entry.value), allow_pickle=False)


def write_safetensors(out: IO[bytes], arrays: Iterator[tuple[str, NDArray[Any]]],
                       layout: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> None:
    """``layout``: ``(key, dtype name, shape, bytes)`` of each array, in the order ``arrays`` yields them."""
    header: dict[str, Any] = {}
    offset = 0
    for path, dtype, shape, nbytes in layout:
        header[path] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
    for _path, array in arrays:
        out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def npz_strings(name: str, array: NDArray[Any]) -> NDArray[Any] | None:
    """A string tensor as a fixed-width ``S`` array (no pickle), or ``None`` if that would lose bytes.

    numpy's ``S`` strips trailing NUL bytes when read back, so a tensor with such strings
    cannot be stored exactly and is skipped (with a warning) instead.
    """
    flat = array.reshape(-1)
    if any(value.endswith(b"\0") for value in flat):
        return None
    width = max((len(value) for value in flat), default=1) or 1
    return np.array(flat.tolist(), dtype=f"S{width}").reshape(array.shape) if flat.size else \
        np.empty(array.shape, dtype="S1")
