"""ChunkGrid: the compact form of a sharded array's chunks (issue 16) - round trip, hostile grids,
and the chunks a box overlaps found by bisection, checked against the per-chunk form."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format.chunks import (
    GRID_MIN_CHUNKS,
    Chunk,
    ChunkGrid,
    as_grid,
    grid_from_json,
    grid_to_json,
    overlapping,
)


def grid_chunks(shape: tuple[int, ...], splits: tuple[tuple[int, ...], ...], itemsize: int = 4,
                hashed: bool = True, block: int = 0) -> list[Chunk]:
    """Chunks of a full grid, in a shuffled order, each in object (i % 3) at increasing offsets."""
    out = []
    offsets = [0, 0, 0]
    cells = list(itertools.product(*[range(len(s)) for s in splits]))
    for i, cell in enumerate(reversed(cells)):
        start = tuple(splits[d][c] for d, c in enumerate(cell))
        extent = tuple((splits[d][c + 1] if c + 1 < len(splits[d]) else shape[d]) - start[d]
                       for d, c in enumerate(cell))
        length = math.prod(extent) * itemsize
        obj = i % 3
        blocks = tuple(range(-(-length // block))) if block and length > block else ()
        out.append(Chunk(obj, offsets[obj], length, (i * 2654435761) % 2**32, start, extent,
                         block if blocks else 0, blocks, f"xxh3_128:{i:032x}" if hashed else None))
        offsets[obj] += length
    return out


def _fail(problem: str) -> Exception:
    return CheckpointFormatError(problem)


def test_a_grid_round_trips_and_reads_like_its_chunks() -> None:
    shape = (64, 48)
    splits = (tuple(range(0, 64, 8)), tuple(range(0, 48, 6)))
    chunks = grid_chunks(shape, splits, block=4096)
    grid = as_grid(shape, 4, chunks)
    assert isinstance(grid, ChunkGrid) and len(grid) == len(chunks) == GRID_MIN_CHUNKS
    assert sorted(grid, key=lambda c: c.start) == sorted(chunks, key=lambda c: c.start)
    sizes = [10**9] * 3
    back = grid_from_json(grid_to_json(grid), shape, 4, sizes, _fail)
    assert back == grid and list(back) == list(grid)


def test_chunks_that_are_no_grid_stay_chunks() -> None:
    shape = (64, 64)
    chunks = grid_chunks(shape, (tuple(range(0, 64, 8)), tuple(range(0, 64, 8))))
    assert as_grid(shape, 4, chunks[:-1]) is None  # a missing cell
    bricks = [Chunk(0, 0, 4 * 8, 0, (r, (r % 2) * 4), (1, 8 if r % 2 == 0 else 4)) for r in range(64)]
    assert as_grid(shape, 4, bricks) is None
    assert as_grid(shape, 4, chunks[: GRID_MIN_CHUNKS - 1]) is None  # few chunks: the readable form


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d.update(splits=[[0, 8], [0, 8]]), "holds"),                 # counts no longer match the columns
    (lambda d: d.update(splits=[[1, 8], list(range(0, 64, 8))]), "rise strictly from 0"),
    (lambda d: d.update(splits=[[0, 8, 8], list(range(0, 64, 8))]), "rise strictly"),
    (lambda d: d.update(splits=[[0, 70], list(range(0, 64, 8))]), "below 64"),
    (lambda d: d.update(object="!!"), "not base64"),
    (lambda d: d.update(hash=d["hash"][:-8]), "hashes"),
    (lambda d: d.update(extra=1), "grid fields"),
    (lambda d: d.update(splits=[list(range(0, 64, 8))]), "per dimension"),
])
def test_hostile_grids_are_refused(mutate: object, problem: str) -> None:
    shape = (64, 64)
    grid = as_grid(shape, 4, grid_chunks(shape, (tuple(range(0, 64, 8)), tuple(range(0, 64, 8)))))
    assert grid is not None
    doc = grid_to_json(grid)
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(CheckpointFormatError, match=problem):
        grid_from_json(doc, shape, 4, [10**9] * 3, _fail)


def test_a_grid_past_its_objects_or_naming_a_missing_one_is_refused() -> None:
    shape = (64, 64)
    grid = as_grid(shape, 4, grid_chunks(shape, (tuple(range(0, 64, 8)), tuple(range(0, 64, 8)))))
    assert grid is not None
    with pytest.raises(CheckpointFormatError, match="runs past the end"):
        grid_from_json(grid_to_json(grid), shape, 4, [100, 100, 100], _fail)
    with pytest.raises(CheckpointFormatError, match="names object 2 of 2"):
        grid_from_json(grid_to_json(grid), shape, 4, [10**9] * 2, _fail)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_overlapping_chunks_match_a_brute_force_search(data: st.DataObject) -> None:
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.integers(4, 40)) for _ in range(ndim))
    splits = tuple(tuple(sorted({0, *data.draw(st.lists(st.integers(1, n - 1), max_size=5))})) for n in shape)
    chunks = grid_chunks(shape, splits)  # a grid of any size, built directly (as_grid wants many chunks)
    grid = ChunkGrid(shape, 4, splits, np.zeros(len(chunks), dtype=np.int64), np.zeros(len(chunks), dtype=np.int64),
                     np.zeros(len(chunks), dtype=np.uint32), 0, np.zeros(0, dtype=np.uint32), None)
    start = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    extent = tuple(data.draw(st.integers(1, n - s)) for n, s in zip(shape, start, strict=True))
    fast = sorted(c.start for c in overlapping(grid, start, extent))
    brute = sorted(c.start for c in overlapping(list(grid), start, extent))
    assert fast == brute and fast


def test_a_sharded_array_of_many_shards_is_written_as_a_grid_and_reshards(tmp_path: Path) -> None:
    """64 shards on an 8x8 mesh: one grid in the index; restored onto another mesh and as a whole array."""
    import json

    import cloudckpt
    from cloudckpt import Checkpoint, Layout, Mesh, ShardedArray
    from cloudckpt.coordination import LocalCoordinator
    from cloudckpt.format import decode_index

    full = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    mesh = Mesh(("x", "y"), (8, 8), coordinator=LocalCoordinator())
    path = Checkpoint(w=ShardedArray.from_global(full, Layout(["x", "y"], mesh))).write(tmp_path / "c")
    doc = json.loads((tmp_path / "c.index").read_text())
    assert "grid" in doc["entries"]["w"] and "chunks" not in doc["entries"]["w"]
    index = decode_index((tmp_path / "c.index").read_bytes(), "c", path)
    assert isinstance(index.entries["w"].chunks, ChunkGrid) and len(index.entries["w"].chunks) == 64  # type: ignore[union-attr]
    other = ShardedArray((64, 48), np.float32, Layout(["y", "x"], Mesh(("x", "y"), (4, 2),
                                                                        coordinator=LocalCoordinator())))
    Checkpoint(w=other).read(path).expect_partial()
    np.testing.assert_array_equal(other.to_numpy(), full)
    np.testing.assert_array_equal(cloudckpt.load_variable(path, "w"), full)
    assert dict(cloudckpt.list_variables(path))["w"] == [64, 48]
    doc["version"] = 1  # a version-1 reader's view: the grid is an unknown field
    with pytest.raises(CheckpointFormatError, match="unknown field"):
        decode_index(json.dumps(doc).encode(), "c", path)
