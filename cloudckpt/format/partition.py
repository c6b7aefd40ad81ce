"""Whether an array's chunks partition it: pairwise disjoint and covering it exactly.

An index from a bucket other people write to may describe any boxes, and a restore that
trusted overlapping or missing boxes would read some bytes twice and leave others
unwritten. Comparing every pair of boxes is quadratic (a 4,096-shard array took ~10 s),
so the proof here is linear in the boxes and the cells they cut the array into:

1. **Grid marking** (every layout cloudckpt writes): the distinct box boundaries of each
   dimension cut the array into a grid of cells, and every box is a block of whole cells.
   Mark each box's block in a table of cells, stopping at the first cell marked twice;
   the boxes partition the array iff no cell is marked twice and none is left unmarked.
   A layout over a mesh (even splits, uneven ones, empty shards) has one cell per box,
   so the cost is the number of boxes; at most ``2 * cells`` cells are ever visited.
2. **Corner counting** (irregular layouts with few split dimensions, such as bricks
   offset row by row, where the grid has far more cells than there are boxes): give each
   corner of a ``k``-dimensional box the sign ``(-1)^(upper bounds in it)`` and add the
   signs up per corner point. That sum is the mixed finite difference of "how many boxes
   cover each point", an invertible transform, so it equals the array's own corners
   exactly iff every point is covered exactly once. Cost ``boxes * 2^k`` and a sort.

Dimensions no box splits (every box spans them whole) are left out of both; a layout
neither method can check within its budget (a partition cut along dozens of dimensions,
which no mesh produces) is refused as too irregular, never accepted unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

#: Cells of the grid marking table at most (an int32 each: 16 MiB).
GRID_CELL_BUDGET = 1 << 22
#: Corner coordinates generated at most (``boxes * 2^k * k``, int32 each: 32 MiB).
CORNER_BUDGET = 1 << 23

Box = tuple[tuple[int, ...], tuple[int, ...]]
Method = Literal["grid", "corners"]


def partition_problem(shape: Sequence[int], boxes: Sequence[Box], method: Method | None = None, *,
                      budget: int | None = None, noun: str = "chunk") -> str | None:
    """``None`` if ``boxes`` (``(start, extent)``, each inside ``shape``) partition the array, else why not.

    Zero-size boxes hold no element and are ignored. ``method`` forces one proof (tests);
    by default the cheaper one that fits its budget is used. ``budget`` lowers both budgets
    (cells, corner coordinates) for a caller that bounds memory by its input's size (a
    TensorFlow bundle's slices); ``noun`` is what the messages call a box.
    """
    cell_budget = GRID_CELL_BUDGET if budget is None else min(budget, GRID_CELL_BUDGET)
    corner_budget = CORNER_BUDGET if budget is None else min(budget, CORNER_BUDGET)
    nonempty = [(start, extent) for start, extent in boxes if math.prod(extent)]
    if not nonempty:
        return None if math.prod(shape) == 0 else f"no {noun} holds any element"
    starts = np.array([start for start, _ in nonempty], dtype=np.int64).reshape(len(nonempty), len(shape))
    ends = starts + np.array([extent for _, extent in nonempty], dtype=np.int64).reshape(starts.shape)
    cuts: list[NDArray[np.int64]] = []
    active: list[int] = []
    for d, dim in enumerate(shape):
        points = np.unique(np.concatenate([starts[:, d], ends[:, d], np.array([0, dim], dtype=np.int64)]))
        if len(points) > 2:
            active.append(d)
            cuts.append(points)
    if not active:  # every box spans the whole array
        return None if len(nonempty) == 1 else f"{noun}s at {nonempty[0][0]} and {nonempty[1][0]} overlap"
    grid_shape = tuple(len(c) - 1 for c in cuts)
    cells = math.prod(grid_shape)
    corners = len(nonempty) << len(active)
    if method is None:
        if cells <= cell_budget and cells <= corners:
            method = "grid"
        elif corners * len(active) <= corner_budget:
            method = "corners"
        elif cells <= cell_budget:
            method = "grid"
        else:
            return (f"the layout of {len(nonempty)} {noun}s split along {len(active)} dimensions is too "
                    f"irregular to verify ({cells} grid cells)")
    lo = np.stack([np.searchsorted(c, starts[:, d]) for d, c in zip(active, cuts, strict=True)], axis=1)
    hi = np.stack([np.searchsorted(c, ends[:, d]) for d, c in zip(active, cuts, strict=True)], axis=1)
    if method == "grid":
        return _grid([start for start, _ in nonempty], lo, hi, grid_shape, noun,
                     lambda cell: tuple(int(cuts[active.index(d)][cell[active.index(d)]]) if d in active else 0
                                        for d in range(len(shape))))
    return _corners(lo, hi, grid_shape, noun)


def _grid(starts: Sequence[tuple[int, ...]], lo: NDArray[np.intp], hi: NDArray[np.intp],
          grid_shape: tuple[int, ...], noun: str,
          corner_of: Callable[[tuple[int, ...]], tuple[int, ...]]) -> str | None:
    """Mark each box's block of cells with its number; the first cell marked twice is an overlap."""
    owner = np.full(grid_shape, -1, dtype=np.int32)
    for row, start in enumerate(starts):
        block = owner[tuple(slice(int(a), int(b)) for a, b in zip(lo[row], hi[row], strict=True))]
        taken = block[block >= 0]
        if taken.size:
            other = starts[int(taken[0])]
            return f"{noun}s at {other} and {start} overlap"
        block[...] = row
    if (owner < 0).any():
        gap = tuple(int(i) for i in np.argwhere(owner < 0)[0])
        return f"{noun}s do not cover the array (no {noun} holds the element at {corner_of(gap)})"
    return None


def _corners(lo: NDArray[np.intp], hi: NDArray[np.intp], grid_shape: tuple[int, ...], noun: str) -> str | None:
    """Signed corners of the boxes minus the array's own must cancel at every point."""
    n, k = lo.shape
    lo, hi = lo.astype(np.int32), hi.astype(np.int32)
    masks = (np.arange(1 << k)[:, None] >> np.arange(k)[None, :]) & 1  # (2^k, k): 1 = upper bound
    signs = np.where(masks.sum(axis=1) % 2 == 0, 1, -1).astype(np.int64)
    points = np.where(masks[None, :, :] == 1, hi[:, None, :], lo[:, None, :]).reshape(n << k, k)
    whole = np.where(masks == 1, np.array(grid_shape, dtype=np.int32)[None, :], 0).astype(np.int32)
    points = np.concatenate([points, whole])
    weights = np.concatenate([np.tile(signs, n), -signs])
    order = np.lexsort(points.T[::-1])
    points, weights = points[order], weights[order]
    starts = np.flatnonzero(np.concatenate([[True], (points[1:] != points[:-1]).any(axis=1)]))
    if np.add.reduceat(weights, starts).any():
        return f"{noun}s overlap or do not cover the array exactly"
    return None
