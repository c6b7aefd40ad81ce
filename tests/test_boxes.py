"""The chunk-partition proof (``cloudckpt.format.partition``) against the brute-force pairwise check it replaced."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import (
    ArrayEntry,
    CheckpointIndex,
    Chunk,
    DataObject,
    NodeEntry,
    data_key,
    decode_index,
    encode_index,
)
from cloudckpt.format.partition import Box, partition_problem

METHODS = (None, "grid", "corners")


def brute_force(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    """The old check: every pair of non-empty boxes disjoint, and their volumes add up to the array's."""
    nonempty = [b for b in boxes if math.prod(b[1])]
    for i, (a_start, a_shape) in enumerate(nonempty):
        for b_start, b_shape in nonempty[i + 1:]:
            if all(max(a, b) < min(a + m, b + n)
                   for a, m, b, n in zip(a_start, a_shape, b_start, b_shape, strict=True)):
                return False
    return sum(math.prod(b[1]) for b in nonempty) == math.prod(shape)


def inside(shape: tuple[int, ...], box: Box) -> bool:
    return all(s >= 0 and n >= 0 and s + n <= d for s, n, d in zip(box[0], box[1], shape, strict=True))


@st.composite
def layouts(draw: Any) -> tuple[tuple[int, ...], list[Box]]:
    """A grid partition of a small array, then maybe merged, broken or padded in tricky ways."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    edges = [sorted({0, dim, *draw(st.lists(st.integers(0, dim), max_size=3))}) for dim in shape]
    boxes: list[Box] = [
        (tuple(e[i] for e, i in zip(edges, cell, strict=True)),
         tuple(e[i + 1] - e[i] for e, i in zip(edges, cell, strict=True)))
        for cell in np.ndindex(*(len(e) - 1 for e in edges))]
    boxes = [(tuple(int(x) for x in s), tuple(int(x) for x in n)) for s, n in boxes]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["merge", "shift", "grow-last", "duplicate", "zero", "drop", "random"]))
        i = draw(st.integers(0, len(boxes) - 1))
        start, extent = boxes[i]
        if kind == "merge":  # two neighbours that make one box: still a partition, no longer a grid
            for j, (s2, n2) in enumerate(boxes):
                d = next((d for d in range(ndim) if s2[d] == start[d] + extent[d]), None)
                if j != i and d is not None and all(s2[k] == start[k] and n2[k] == extent[k]
                                                    for k in range(ndim) if k != d):
                    boxes[i] = (start, tuple(n + n2[k] if k == d else n for k, n in enumerate(extent)))
                    del boxes[j]
                    break
        elif kind == "shift":
            d = draw(st.integers(0, ndim - 1))
            delta = draw(st.sampled_from([-1, 1]))
            boxes[i] = (tuple(s + delta if k == d else s for k, s in enumerate(start)), extent)
        elif kind == "grow-last":  # overlap only in the last dimension
            boxes[i] = (start, (*extent[:-1], extent[-1] + 1))
        elif kind == "duplicate":
            boxes.append(boxes[i])
        elif kind == "zero":
            boxes.insert(i, (start, tuple(0 if k == ndim - 1 else n for k, n in enumerate(extent))))
        elif kind == "drop" and len(boxes) > 1:
            del boxes[i]
        elif kind == "random":
            s = tuple(draw(st.integers(0, dim - 1)) for dim in shape)
            boxes.append((s, tuple(draw(st.integers(0, dim - a)) for a, dim in zip(s, shape, strict=True))))
    boxes = [b for b in boxes if inside(shape, b)]
    return shape, draw(st.permutations(boxes))


@settings(max_examples=800, deadline=None)
@given(layouts())
def test_agrees_with_the_pairwise_check(layout: tuple[tuple[int, ...], list[Box]]) -> None:
    shape, boxes = layout
    expected = brute_force(shape, boxes)
    for method in METHODS:
        assert (partition_problem(shape, boxes, method) is None) == expected, (method, shape, boxes)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("shape", "boxes", "ok"), [
    pytest.param((4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))], True, id="touching, not overlapping"),
    pytest.param((4, 4), [((0, 0), (4, 2)), ((0, 2), (4, 2))], True, id="touching in the last dim"),
    pytest.param((4, 4), [((0, 0), (4, 3)), ((0, 2), (4, 2))], False, id="overlap in the last dim only"),
    pytest.param((2, 2, 4), [((0, 0, 0), (2, 2, 2)), ((0, 0, 1), (2, 2, 2))], False, id="3-D, last dim"),
    pytest.param((4,), [((0,), (2,)), ((0,), (2,)), ((2,), (2,))], False, id="duplicate box"),
    pytest.param((4, 4), [((0, 0), (4, 4)), ((0, 0), (4, 4))], False, id="duplicate whole array"),
    pytest.param((4,), [((0,), (4,)), ((1,), (0,)), ((4,), (0,))], True, id="zero-size chunks"),
    pytest.param((4,), [((0,), (0,)), ((0,), (0,))], False, id="only zero-size chunks"),
    pytest.param((0, 3), [((0, 0), (0, 3)), ((0, 0), (0, 3))], True, id="empty array"),
    pytest.param((4, 4), [((0, 0), (2, 4)), ((1, 0), (2, 4)), ((3, 0), (1, 2)), ((3, 2), (1, 2))], False,
                 id="overlap and gap, volumes add up"),
    pytest.param((3, 3), [((0, 0), (2, 1)), ((0, 1), (1, 2)), ((1, 1), (1, 1)), ((2, 0), (1, 2)),
                          ((1, 2), (2, 1))], True, id="pinwheel (no guillotine cut)"),
    pytest.param((), [((), ())], True, id="scalar"),
    pytest.param((), [((), ()), ((), ())], False, id="scalar twice"),
])
def test_tricky_layouts(method: Any, shape: tuple[int, ...], boxes: list[Box], ok: bool) -> None:
    assert brute_force(shape, boxes) == ok  # the cases mean what their names say
    assert (partition_problem(shape, boxes, method) is None) == ok


def test_messages_name_the_chunks() -> None:
    assert partition_problem((4, 4), [((0, 0), (4, 3)), ((0, 2), (4, 2))]) == "chunks at (0, 0) and (0, 2) overlap"
    assert "(3, 2)" in (partition_problem((4, 4), [((0, 0), (3, 4)), ((3, 0), (1, 2))], "grid") or "")


def test_a_layout_cut_along_many_dimensions_is_refused_not_trusted() -> None:
    """A staircase of cuts along 30 dimensions: 2^30 grid cells and corners; no mesh makes one."""
    ndim = 30
    shape = (2,) * ndim
    boxes: list[Box] = []
    for d in range(ndim):  # box d: coordinate 0 in dim d, 1 in every earlier dim, anything later
        boxes.append(((1,) * d + (0,) * (ndim - d), (1,) * (d + 1) + (2,) * (ndim - d - 1)))
    boxes.append(((1,) * ndim, (1,) * ndim))
    assert brute_force(shape, boxes)
    assert "too irregular to verify" in (partition_problem(shape, boxes) or "")


def sharded_index(shape: tuple[int, ...], boxes: list[Box]) -> bytes:
    chunks, offset = [], 0
    for start, extent in boxes:
        length = math.prod(extent) * 4
        chunks.append(Chunk(0, offset, length, 0, start, extent))
        offset += length
    obj = data_key("c", 0, 1, "x")
    return encode_index(CheckpointIndex("c", {"": NodeEntry("object", ("w",)),
                                              "w": ArrayEntry("float32", shape, "ndarray", tuple(chunks))},
                                        (DataObject(obj, offset),)))


def test_an_index_of_many_shards_is_verified_not_refused() -> None:
    """The pairwise check gave up above 4,096 chunks ("too many chunks to verify")."""
    boxes: list[Box] = [((i * 2, 0), (2, 3)) for i in range(5000)]
    index = decode_index(sharded_index((10000, 3), boxes), "c", "x")
    assert len(index.entries["w"].chunks) == 5000  # type: ignore[union-attr]
    grid: list[Box] = [((i, j), (1, 1)) for i in range(80) for j in range(80)]
    decode_index(sharded_index((80, 80), grid), "c", "x")


def test_an_index_with_overlapping_shards_is_refused() -> None:
    boxes: list[Box] = [((i * 2, 0), (2, 3)) for i in range(5000)]
    boxes[4000] = ((7999, 0), (2, 3))  # overlaps its neighbour by a row; the row it left is a gap
    with pytest.raises(CheckpointFormatError, match=r"chunks at \(7998, 0\) and \(7999, 0\) overlap"):
        decode_index(sharded_index((10000, 3), boxes), "c", "x")
