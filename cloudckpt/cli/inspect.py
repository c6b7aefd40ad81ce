"""``cloudckpt inspect URL/ckpt-N``: what a checkpoint holds, from its index alone.

Everything but the values of 0-d arrays comes from the index (one GET). Those values
(``save_counter``, a step ``Variable``) are what people look for first, so they are
fetched too - in one coalesced ranged read, CRC32C-checked like any restore.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cloudckpt.cli import tf
from cloudckpt.cli.common import EXIT_NOT_FOUND, CliError, human_size, print_json, print_table
from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, ValueEntry, parse_dtype
from cloudckpt.reader import ReadTarget, new_buffer, read_arrays
from cloudckpt.storage import Storage, resolve
from cloudckpt.tfbundle import Bundle, load_any_index

#: Largest array whose value ``inspect`` shows (0-d arrays are a few bytes each).
_SCALAR_BYTES = 64


def array_nbytes(entry: ArrayEntry) -> int:
    return math.prod(entry.shape) * parse_dtype(entry.dtype).itemsize


def json_value(value: Any) -> Any:
    """A value as strict JSON (non-finite floats as strings, as the index stores them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def scalar_values(storage: Storage, index: CheckpointIndex) -> dict[str, Any]:
    """The values of 0-d arrays (one coalesced ranged read, CRC32C checked)."""
    targets = []
    for path, entry in index.entries.items():
        if isinstance(entry, ArrayEntry) and entry.shape == () and array_nbytes(entry) <= _SCALAR_BYTES:
            targets.append(ReadTarget(path, entry, new_buffer(entry), live=False))
    if not targets:
        return {}
    read_arrays(storage, index, targets)
    out: dict[str, Any] = {}
    for target in targets:
        value = target.dest[()]
        out[target.path] = value.item() if hasattr(value, "item") and target.dest.dtype.kind in "biuf" else str(value)
    return out


def _entry_json(path: str, entry: ArrayEntry | ValueEntry, index: CheckpointIndex,
                values: dict[str, Any]) -> dict[str, Any]:
    if isinstance(entry, ValueEntry):
        return {"key": path, "kind": "value", "type": entry.type, "value": json_value(entry.value)}
    doc: dict[str, Any] = {"key": path, "kind": "array", "dtype": entry.dtype, "shape": list(entry.shape),
                           "size": array_nbytes(entry), "pytype": entry.pytype}
    if path in values:
        doc["value"] = json_value(values[path])
    doc["chunks"] = [{"object": index.objects[c.object].name, "offset": c.offset, "length": c.length,
                      "crc32c": c.crc32c, "start": list(c.start), "shape": list(c.shape)} for c in entry.chunks]
    return doc


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _short(value: Any, width: int = 50) -> str:
    text = json.dumps(json_value(value), default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def run(args: Any) -> int:
    location = resolve(args.url)
    storage, name = location.storage, location.name
    index = load_any_index(storage, name)
    if isinstance(index, Bundle):
        return tf.inspect(index, args)
    leaves = {p: e for p, e in index.entries.items() if not isinstance(e, NodeEntry)}
    values = {} if args.no_values else scalar_values(storage, index)
    data_bytes = sum(o.size for o in index.objects)
    by_checkpoint = index.bytes_by_checkpoint()
    shared = {k: v for k, v in by_checkpoint.items() if k != name}
    if args.json:
        print_json({"checkpoint": storage.url_for(name), "name": name, "format_version": index.version,
                    "metadata": dict(index.metadata), "data_bytes": data_bytes,
                    "new_bytes": by_checkpoint.get(name, 0), "shared_bytes": dict(sorted(shared.items())),
                    "objects": [{"name": o.name, "size": o.size} for o in index.objects],
                    "entries": [_entry_json(p, e, index, values) for p, e in leaves.items()]})
        return 0
    arrays = [e for e in leaves.values() if isinstance(e, ArrayEntry)]
    print(f"checkpoint  {storage.url_for(name)}")
    print(f"format      cloudckpt-index version {index.version}")
    print(f"data        {len(arrays)} arrays, {len(leaves) - len(arrays)} inline values, "
          f"{human_size(data_bytes)} in {len(index.objects)} data object(s)")
    if shared:
        print(f"shared      {human_size(by_checkpoint.get(name, 0))} new in this checkpoint; unchanged bytes "
              "referenced in " + ", ".join(f"{k} ({human_size(v)})" for k, v in sorted(shared.items())))
    if index.metadata:
        print(f"metadata    {json.dumps(dict(index.metadata), default=str)}")
    print()
    if not leaves:
        raise CliError(f"{storage.url_for(name)} holds no values", EXIT_NOT_FOUND)
    table = [["KEY", "DTYPE", "SHAPE", "SIZE", "VALUE / LAYOUT"]]
    for path, entry in leaves.items():
        if isinstance(entry, ValueEntry):
            table.append([path, entry.type, "", "", _short(entry.value)])
            continue
        layout = _short(values[path]) if path in values else ""
        if len(entry.chunks) > 1:
            layout = f"sharded: {len(entry.chunks)} chunks"
        dtype = "bytes" if entry.pytype == "bytes" else entry.dtype  # an opaque byte item (DCP's)
        table.append([path, dtype, _shape(entry.shape), human_size(array_nbytes(entry)), layout])
        if len(entry.chunks) > 1 and args.chunks:
            for i, chunk in enumerate(entry.chunks):
                table.append([f"  [{i}]", "", _shape(chunk.shape), human_size(chunk.length),
                              f"at {_shape(chunk.start)} in {index.objects[chunk.object].name}"
                              f" [{chunk.offset}, {chunk.offset + chunk.length})"])
    print_table(table)
    return 0
