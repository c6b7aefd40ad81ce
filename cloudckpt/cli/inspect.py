"""``cloudckpt inspect URL/ckpt-N``: print what :func:`cloudckpt.tools.inspect_checkpoint` finds."""

from __future__ import annotations

import json
from typing import Any

from cloudckpt.cli import foreign, tf
from cloudckpt.cli.common import EXIT_NOT_FOUND, CliError, human_size, print_json, print_table
from cloudckpt.format import ArrayEntry, ValueEntry
from cloudckpt.tools.foreign import ForeignInfo
from cloudckpt.tools.inspect import BundleInfo, array_nbytes, inspect_checkpoint, json_value


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _short(value: Any, width: int = 50) -> str:
    text = json.dumps(json_value(value), default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def run(args: Any) -> int:
    info = inspect_checkpoint(args.url, values=not args.no_values)
    if isinstance(info, BundleInfo):
        return tf.inspect(info, args)
    if isinstance(info, ForeignInfo):
        return foreign.inspect(info, args)
    if args.json:
        print_json(info.to_json())
        return 0
    index, leaves, values, shared = info.index, info.leaves, info.values, info.shared_bytes
    data_bytes, url = info.data_bytes, info.url
    arrays = [e for e in leaves.values() if isinstance(e, ArrayEntry)]
    print(f"checkpoint  {url}")
    print(f"format      cloudckpt-index version {index.version}")
    print(f"data        {len(arrays)} arrays, {len(leaves) - len(arrays)} inline values, "
          f"{human_size(data_bytes)} in {len(index.objects)} data object(s)")
    if shared:
        print(f"shared      {human_size(info.new_bytes)} new in this checkpoint; unchanged bytes "
              "referenced in " + ", ".join(f"{k} ({human_size(v)})" for k, v in shared.items()))
    if index.metadata:
        print(f"metadata    {json.dumps(dict(index.metadata), default=str)}")
    print()
    if not leaves:
        raise CliError(f"{url} holds no values", EXIT_NOT_FOUND)
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
