"""``cloudckpt inspect`` of another framework's checkpoint (torch DCP's layout, Orbax, ...): its tensors by name.

``cloudckpt.tools.inspect`` describes it through its registered reader (``ForeignInfo``).
"""

from __future__ import annotations

import json
from typing import Any

from cloudckpt.cli.common import EXIT_NOT_FOUND, CliError, human_size, print_json, print_table
from cloudckpt.tools.foreign import ForeignInfo


def inspect(info: ForeignInfo, args: Any) -> int:
    tensors, values = info.tensors, info.values
    if args.json:
        print_json(info.to_json())
        return 0
    stored = sum(size or 0 for size in info.sizes.values())
    print(f"checkpoint  {info.url}")
    print(f"format      {info.description}")
    print(f"data        {len(tensors)} tensors, {human_size(sum(t.nbytes for t in tensors))} "
          f"({human_size(stored)} stored)")
    print()
    if not tensors:
        raise CliError(f"{info.url} holds no tensors", EXIT_NOT_FOUND)
    table = [["KEY", "DTYPE", "SHAPE", "SIZE", "VALUE"]]
    for t in tensors:
        value = json.dumps(values[t.name], default=str)[:50] if t.name in values else ""
        table.append([t.name, t.dtype, "[" + ", ".join(map(str, t.shape)) + "]", human_size(t.nbytes), value])
    print_table(table)
    return 0
