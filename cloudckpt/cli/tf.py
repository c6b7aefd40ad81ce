"""``cloudckpt inspect`` of a TensorFlow checkpoint (TensorBundle): its tensors by object path and raw key.

``cloudckpt.tools.inspect`` reads them (``BundleInfo``); the other commands handle a
TensorFlow checkpoint in ``cloudckpt.tools`` too (``verify``, ``copy`` as-is, ``export``).
"""

from __future__ import annotations

import json
from typing import Any

from cloudckpt.cli.common import EXIT_NOT_FOUND, CliError, human_size, print_json, print_table
from cloudckpt.tools.inspect import BundleInfo


def inspect(info: BundleInfo, args: Any) -> int:
    bundle, tensors, values = info.bundle, info.tensors, info.values
    if args.json:
        print_json(info.to_json())
        return 0
    print(f"checkpoint  {bundle.url}")
    print(f"format      {info.description}")
    print(f"data        {len(tensors)} tensors, {human_size(sum(t.nbytes for t in tensors))}")
    print()
    if not tensors:
        raise CliError(f"{bundle.url} holds no tensors", EXIT_NOT_FOUND)
    table = [["KEY", "DTYPE", "SHAPE", "SIZE", "VALUE / LAYOUT", "TENSORFLOW KEY"]]
    for t in tensors:
        layout = json.dumps(values[t.name]) if t.name in values else ""
        if t.slices:
            layout = f"partitioned: {t.slices} slices"
        table.append([t.name, t.dtype, "[" + ", ".join(map(str, t.shape)) + "]", human_size(t.nbytes),
                      layout[:50], t.key if t.key != t.name else ""])
    print_table(table)
    return 0
