"""Index benchmark: how the cost of an index grows with its keys and with an array's shards.

An index is read from a bucket other people may write to, so every restore validates it
whole (tree, types, bounds, that an array's chunks partition it). That must stay linear
(or n log n) in the index: an honest ``Checkpoint(d={f"k{i}": i ...})`` of 40,000 keys
used to take ~8 s to read back and a 4,096-shard array ~10 s to ``list_variables``,
both quadratic. Rows, on local disk (the index costs the same on every store):

- ``keys``: ``Checkpoint(d={f"k{i}": i for i in range(n)})``, 10^5 keys by default.
- ``shards 1-D`` / ``shards 2-D`` / ``bricks 2-D``: one float32 array of ``n`` chunks in
  one data object (10^4 by default): split along one dimension, a 100 x 100 grid, and
  100 rows of bricks, row ``r`` shifted by ``r`` columns (a layout no mesh makes: its grid
  has 100 times more cells than there are chunks, so the corner count proves it).

Columns (best of ``--repeat``, seconds): ``encode`` (``encode_index``), ``decode``
(``decode_index``: parse and validate), ``list_variables`` (fetch + decode + list),
``restore`` (keys: ``Checkpoint.read`` into a template; shards: ``load_variable``, which
assembles the array from its chunks). Not a timed test: nothing here asserts a duration.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.bench_checkpoint import describe_run
from cloudckpt import Checkpoint, list_variables, load_variable
from cloudckpt.format import (
    ArrayEntry,
    CheckpointIndex,
    Chunk,
    DataObject,
    NodeEntry,
    data_key,
    decode_index,
    encode_index,
    index_key,
)
from cloudckpt.storage.checksum import crc32c_of


def best(repeat: int, run: Callable[[], object]) -> float:
    """The fastest of ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def keys_row(directory: Path, n: int, repeat: int) -> list[str]:
    path = Checkpoint(d={f"k{i}": i for i in range(n)}).write(str(directory / "keys"))
    raw = (directory / "keys.index").read_bytes()
    index = decode_index(raw, "keys", path)
    template = Checkpoint(d={f"k{i}": 0 for i in range(n)})
    return ["keys", f"{n}", f"{len(raw) / 2**20:.1f}",
            f"{best(repeat, lambda: encode_index(index)):.3f}",
            f"{best(repeat, lambda: decode_index(raw, 'keys', path)):.3f}",
            f"{best(repeat, lambda: list_variables(path)):.3f}",
            f"{best(repeat, lambda: template.read(path)):.3f}"]


def grid_boxes(shape: tuple[int, ...], splits: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Even splits of ``shape`` into ``prod(splits)`` boxes, C order."""
    edges = [np.linspace(0, dim, parts + 1).astype(int) for dim, parts in zip(shape, splits, strict=True)]
    boxes = []
    for cell in np.ndindex(*splits):
        start = tuple(int(edges[d][i]) for d, i in enumerate(cell))
        extent = tuple(int(edges[d][i + 1] - edges[d][i]) for d, i in enumerate(cell))
        boxes.append((start, extent))
    return boxes


def brick_boxes(rows: int, per_row: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Rows of bricks ``rows`` columns wide, row ``r`` shifted by ``r`` columns: every row has its own edges."""
    width = rows
    total = per_row * width
    boxes = []
    for r in range(rows):
        edges = sorted({0, total, *range(r, total, width)})
        for a, b in itertools.pairwise(edges):
            boxes.append(((r, a), (1, b - a)))
    return boxes


def shards_row(directory: Path, label: str, shape: tuple[int, ...],
               boxes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], repeat: int) -> list[str]:
    """An index of one array in ``len(boxes)`` chunks (one data object, real bytes and CRC32Cs)."""
    name = label.replace(" ", "-")
    full = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    pieces, chunks, offset = [], [], 0
    for start, extent in boxes:
        piece = np.ascontiguousarray(full[tuple(slice(s, s + n) for s, n in zip(start, extent, strict=True))])
        data = piece.tobytes()
        chunks.append(Chunk(0, offset, len(data), crc32c_of([data]), start, extent))
        pieces.append(data)
        offset += len(data)
    obj = data_key(name, 0, 1, "bench")
    (directory / obj).write_bytes(b"".join(pieces))
    index = CheckpointIndex(name, {"": NodeEntry("object", ("w",)),
                                   "w": ArrayEntry("float32", shape, "ndarray", tuple(chunks))},
                            (DataObject(obj, offset),))
    raw = encode_index(index)
    (directory / index_key(name)).write_bytes(raw)
    path = str(directory / name)
    assert np.array_equal(load_variable(path, "w"), full), "the benchmark's index does not read back"
    return [label, f"{len(boxes)}", f"{len(raw) / 2**20:.1f}",
            f"{best(repeat, lambda: encode_index(index)):.3f}",
            f"{best(repeat, lambda: decode_index(raw, name, path)):.3f}",
            f"{best(repeat, lambda: list_variables(path)):.3f}",
            f"{best(repeat, lambda: load_variable(path, 'w')):.3f}"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000, help="keys of the keys row (default 10^5)")
    parser.add_argument("--shards", type=int, default=10_000,
                        help="chunks of the shard rows (default 10^4; the 2-D rows use the nearest square)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the best counts")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10^4 keys, 10^3 shards, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.shards, args.repeat = 10_000, 1_000, 1
    side = max(2, math.isqrt(args.shards))
    rows = [["case", "n", "index MiB", "encode s", "decode s", "list_variables s", "restore s"]]
    print(describe_run(), flush=True)
    with tempfile.TemporaryDirectory(prefix="cloudckpt-bench-index-") as tmp:
        directory = Path(tmp)
        print("keys ...", flush=True)
        rows.append(keys_row(directory, args.keys, args.repeat))
        print("shards ...", flush=True)
        rows.append(shards_row(directory, "shards 1-D", (args.shards * 4, 8),
                               grid_boxes((args.shards * 4, 8), (args.shards, 1)), args.repeat))
        rows.append(shards_row(directory, "shards 2-D", (side * 4, side * 4),
                               grid_boxes((side * 4, side * 4), (side, side)), args.repeat))
        rows.append(shards_row(directory, "bricks 2-D", (side, side * side), brick_boxes(side, side), args.repeat))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) if i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))))
    print(f"{describe_run()} (at the end)")
    return 0
