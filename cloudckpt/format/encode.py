"""Encoding an index: ``CheckpointIndex`` to the JSON bytes a writer PUTs (docs/format.md)."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from cloudckpt.format.chunks import Chunk, ChunkGrid, as_grid, grid_to_json, pack_block_crcs
from cloudckpt.format.dtypes import parse_dtype
from cloudckpt.format.entries import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ArrayEntry,
    CheckpointIndex,
    Entry,
    ValueEntry,
    referenced_checkpoints,
)


# ---------------------------------------------------------------------------- encode
def encode_value(value: object) -> ValueEntry:
    """A JSON leaf for a Python scalar or string; ``TypeError`` for anything else."""
    if value is None:
        return ValueEntry("none", None)
    if isinstance(value, bool):
        return ValueEntry("bool", value)
    if isinstance(value, int):
        return ValueEntry("int", int(value))
    if isinstance(value, float):
        return ValueEntry("float", float(value))
    if isinstance(value, str):
        return ValueEntry("str", value)
    raise TypeError(f"{type(value).__name__} is not a JSON scalar")


def _float_to_json(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _chunk_to_json(c: Chunk) -> dict[str, Any]:
    out: dict[str, Any] = {"object": c.object, "offset": c.offset, "length": c.length, "crc32c": c.crc32c,
                           "start": list(c.start), "shape": list(c.shape)}
    if c.block_crc32c:
        packed = pack_block_crcs(c.block_crc32c)  # little-endian, as in a grid (format version 3)
        out["blocks"] = {"size": c.block_size, "crc32c": base64.b64encode(packed).decode("ascii")}
    if c.hash is not None:
        out["hash"] = c.hash
    return out


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    if isinstance(entry, ArrayEntry):
        array: dict[str, Any] = {"kind": "array", "dtype": entry.dtype, "shape": list(entry.shape),
                                 "pytype": entry.pytype}
        grid = entry.chunks if isinstance(entry.chunks, ChunkGrid) else as_grid(
            entry.shape, parse_dtype(entry.dtype).itemsize, entry.chunks)
        if grid is not None:
            array["grid"] = grid_to_json(grid)  # many chunks on a grid: the compact form (version 2)
        else:
            array["chunks"] = [_chunk_to_json(c) for c in entry.chunks]
        return array
    if isinstance(entry, ValueEntry):
        value = _float_to_json(entry.value) if entry.type == "float" else entry.value
        return {"kind": "value", "type": entry.type, "value": value}
    out: dict[str, Any] = {"kind": "node", "type": entry.type, "children": list(entry.children)}
    if entry.adapter is not None:
        out["adapter"] = entry.adapter
    return out


def encode_index(index: CheckpointIndex) -> bytes:
    """The index as UTF-8 JSON (strict JSON: no NaN literals)."""
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": index.name,
        "objects": [{"name": o.name, "size": o.size} for o in index.objects],
        "entries": {path: _entry_to_json(e) for path, e in index.entries.items()},
        "metadata": dict(index.metadata),
    }
    references = referenced_checkpoints(index.name, index.objects)
    if references:
        doc["references"] = list(references)
    if index.dcp is not None:
        doc["dcp"] = dict(index.dcp)
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
