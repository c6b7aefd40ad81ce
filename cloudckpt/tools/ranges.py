"""Which bytes of its data objects a checkpoint reads, and objects repacked to hold only those.

Why: an incremental save references pieces of earlier checkpoints' objects. Once those
checkpoints are evicted their objects stay, often mostly stale - a whole 4 MB object kept
for an 80-byte constant. ``ls`` reports how much of such an object committed checkpoints
still read; ``cp`` of one checkpoint fetches only the ranges it reads (ranged GETs) and lays
them end to end in a new object of the copy (:class:`Packing`), moving the chunks' offsets.
A chunk's CRC32C, block CRCs and content hash cover its own bytes, which do not change, so
the moved index's records stay valid as they were written.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from cloudckpt.format import ArrayEntry, CheckpointIndex, DataObject, Entry, data_key, referenced_checkpoints
from cloudckpt.format.chunks import ChunkGrid

#: ``[start, end)`` bytes of one object.
Span = tuple[int, int]

#: A data object is repacked when the checkpoint reads at most this fraction of it: above it,
#: the copy would save less than half of the transfer and the storage, for more requests.
PACK_MAX_FRACTION = 0.5

_SHARD = re.compile(r"\.data-(\d{5})-of-(\d{5})\.[^./]+$")


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Sorted, disjoint spans: overlapping and touching ones joined, empty ones dropped."""
    out: list[Span] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def span_bytes(spans: Iterable[Span]) -> int:
    return sum(end - start for start, end in spans)


def object_spans(index: CheckpointIndex) -> dict[int, list[Span]]:
    """Per object number of ``index``, the merged byte spans its chunks read (objects it reads nothing of: absent)."""
    raw: dict[int, list[Span]] = {}
    for entry in index.entries.values():
        if not isinstance(entry, ArrayEntry):
            continue
        if isinstance(entry.chunks, ChunkGrid):  # columns: no Chunk object per cell
            grid = entry.chunks
            ends = grid.offsets + grid.lengths()
            for obj, start, end in zip(grid.objects.tolist(), grid.offsets.tolist(), ends.tolist(), strict=True):
                raw.setdefault(obj, []).append((start, end))
        else:
            for chunk in entry.chunks:
                raw.setdefault(chunk.object, []).append((chunk.offset, chunk.offset + chunk.length))
    return {obj: merged for obj, spans in raw.items() if (merged := merge_spans(spans))}


@dataclass(frozen=True, slots=True)
class Packing:
    """One object copied as only the spans a checkpoint reads, laid end to end in ``target``.

    Attributes:
        source: the object's key in the source directory.
        target: the new object's key (a data object of the copy, with a suffix of its own).
        spans: the source spans, sorted and disjoint.
        starts: each span's start in the source (for bisection).
        placed: where each span starts in ``target``.
    """

    source: str
    target: str
    spans: tuple[Span, ...]
    starts: tuple[int, ...]
    placed: tuple[int, ...]

    @classmethod
    def of(cls, source: str, target: str, spans: Iterable[Span]) -> Packing:
        merged = tuple(merge_spans(spans))
        placed, at = [], 0
        for start, end in merged:
            placed.append(at)
            at += end - start
        return cls(source, target, merged, tuple(s for s, _ in merged), tuple(placed))

    @property
    def size(self) -> int:
        return span_bytes(self.spans)

    def moved(self, offset: int) -> int:
        """Where source offset ``offset`` (inside a span) lands in ``target``."""
        i = bisect.bisect_right(self.starts, offset) - 1
        return self.placed[i] + offset - self.spans[i][0]

    def moved_many(self, offsets: NDArray[np.int64]) -> NDArray[np.int64]:
        """:meth:`moved` for many offsets at once (a grid's column)."""
        starts = np.array(self.starts, dtype=np.int64)
        i = np.searchsorted(starts, offsets, side="right") - 1
        moved: NDArray[np.int64] = np.array(self.placed, dtype=np.int64)[i] + offsets - starts[i]
        return moved

    def source_ranges(self, start: int, end: int) -> list[Span]:
        """The source spans that make bytes ``[start, end)`` of ``target``, in order."""
        out: list[Span] = []
        i = max(bisect.bisect_right(self.placed, start) - 1, 0)
        while i < len(self.spans) and self.placed[i] < end:
            lo, hi = self.spans[i]
            first = max(start - self.placed[i], 0)
            last = min(end - self.placed[i], hi - lo)
            if first < last:
                out.append((lo + first, lo + last))
            i += 1
        return out


def packed_name(source: str, name: str, suffix: str) -> str:
    """A key for ``source``'s repacked bytes as a data object of checkpoint ``name``: its shard
    numbering and spread layout kept, ``suffix`` new (unique to this copy's write)."""
    match = _SHARD.search(source)
    if match is None:
        raise ValueError(f"{source!r} is not a data object")
    return data_key(name, int(match[1]), int(match[2]), suffix, spread="/" in source)


def plan_packings(index: CheckpointIndex, targets: Mapping[int, str]) -> dict[int, Packing]:
    """The objects of ``index`` worth repacking (it reads at most ``PACK_MAX_FRACTION`` of them),
    among the candidates ``targets`` (object number -> the new object's key)."""
    spans = object_spans(index)
    out = {}
    for obj, target in targets.items():
        read = spans.get(obj, [])
        size = index.objects[obj].size
        if size and span_bytes(read) <= PACK_MAX_FRACTION * size:
            out[obj] = Packing.of(index.objects[obj].name, target, read)
    return out


def packed_index(index: CheckpointIndex, packings: Mapping[int, Packing]) -> CheckpointIndex:
    """``index`` with the packed objects replaced by their targets and their chunks' offsets moved."""
    if not packings:
        return index
    objects = tuple(DataObject(packings[i].target, packings[i].size) if i in packings else o
                    for i, o in enumerate(index.objects))
    entries = {path: _moved_entry(entry, packings) for path, entry in index.entries.items()}
    return replace(index, objects=objects, entries=entries, references=referenced_checkpoints(index.name, objects))


def _moved_entry(entry: Entry, packings: Mapping[int, Packing]) -> Entry:
    if not isinstance(entry, ArrayEntry):
        return entry
    if isinstance(entry.chunks, ChunkGrid):
        grid = entry.chunks
        offsets = grid.offsets.copy()
        for obj, packed in packings.items():
            mask = grid.objects == obj
            if mask.any():
                offsets[mask] = packed.moved_many(offsets[mask])
        return replace(entry, chunks=grid.moved(offsets))
    chunks = []
    for chunk in entry.chunks:
        packing = packings.get(chunk.object)
        # an empty chunk reads nothing: offset 0 is inside any object
        chunks.append(chunk if packing is None else
                      replace(chunk, offset=packing.moved(chunk.offset) if chunk.length else 0))
    return replace(entry, chunks=tuple(chunks))
