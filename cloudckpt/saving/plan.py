"""The save plan: a pure function of what every host reported (one host is the one-rank case).

Every host describes its pieces (``(key path, start, shape, bytes)`` of each shard it
holds) and the arrays it knows; the descriptions are all-gathered, and every host then
computes the *same* plan from the same list - no second round trip. The plan says:

- which host writes each distinct box: a box held by several hosts (a replica) is
  written once, by the holder with the fewest bytes assigned so far (largest boxes
  first), so replicas spread the work instead of piling it on rank 0; with an
  ``io_device``, the I/O host writes what it holds itself and the others send it theirs;
- how the writing hosts' pieces are grouped into data objects, and their global
  numbering ``data-0000k-of-0000N`` (host r's objects follow those of ranks < r), all
  with the one write-unique suffix the committing host chose;
- that every array is covered exactly once by disjoint boxes - checked before any byte
  moves, so an inconsistent sharding fails the save instead of producing a bad index;
- which objects hold a host's *early* pieces (an async save's state beyond its staging
  budget, uploaded from live memory before ``save`` returns): they get objects of their
  own, numbered first among that host's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cloudckpt.errors import PlanError
from cloudckpt.format.partition import partition_problem
from cloudckpt.saving.objects import PieceId, pack


@dataclass(frozen=True, slots=True)
class PieceDescription:
    """One piece a host holds: ``(key path, start)``, its shape and its size in bytes."""

    piece: PieceId
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Description:
    """What one host tells the others before a save (all-gathered; identical plans follow).

    Attributes:
        url: where this host believes the checkpoint goes - hosts that disagree would
            otherwise upload to different places and commit an index naming objects that
            are not where it says.
        suffix: this host's candidate write-unique suffix (the committer's is used).
        max_objects: how many data objects this host may write in parallel.
        arrays: every array leaf it knows: key path -> (dtype name, global shape).
        pieces: the pieces it holds.
        early: key paths whose pieces it must upload before ``save`` returns.
    """

    url: str
    suffix: str
    max_objects: int
    arrays: Mapping[str, tuple[str, tuple[int, ...]]]
    pieces: tuple[PieceDescription, ...]
    early: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DescribeFailure:
    """Sent instead of a ``Description`` by a host that could not describe its state."""

    error: str


@dataclass(frozen=True, slots=True)
class PieceInfo:
    """One distinct box of one array, and the ranks holding it."""

    piece: PieceId
    shape: tuple[int, ...]
    nbytes: int
    holders: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UploadPlan:
    """Who uploads which piece into which data object, and how the objects are named.

    (Not torch DCP's ``UploadPlan``: this is the plan every host computes from all hosts'
    descriptions, after any DCP planning.)

    Attributes:
        suffix: the write-unique suffix of every data object.
        committer: the rank that HEADs and commits the index (rank 0, or the io host).
        io_rank: the only rank touching storage, or ``None`` (every rank writes its own).
        writer: the rank that provides each piece's bytes.
        groups: per rank, its data objects' pieces (empty for ranks that upload nothing).
        early: per rank, how many of its first objects hold its early pieces.
        offsets: per rank, the global number of its first data object.
        total_objects: N in ``data-0000k-of-0000N``.
        pieces: every distinct piece, in a deterministic order.
    """

    suffix: str
    committer: int
    io_rank: int | None
    writer: Mapping[PieceId, int]
    groups: tuple[tuple[tuple[PieceId, ...], ...], ...]
    early: tuple[int, ...]
    offsets: tuple[int, ...]
    total_objects: int
    pieces: Mapping[PieceId, PieceInfo]

    def sent_by(self, rank: int) -> list[PieceId]:
        """Pieces ``rank`` sends to the io host, in the order both sides use."""
        return [p for p, w in self.writer.items() if w == rank]


def make_plan(descriptions: Sequence[Description], *, committer: int, io_rank: int | None) -> UploadPlan:
    """The plan every host computes from the all-gathered descriptions (identical everywhere).

    Raises:
        PlanError: hosts disagree on the path, an array's dtype or global shape, hold
            different boxes at the same start, or the boxes of an array overlap or leave holes.
    """
    urls = [desc.url for desc in descriptions]
    if len(set(urls)) > 1:
        differing = next(rank for rank, url in enumerate(urls) if url != urls[0])
        raise PlanError(f"hosts save to different paths: rank 0 to {urls[0]!r}, rank {differing} to "
                        f"{urls[differing]!r}; every rank must pass the same path")
    arrays: dict[str, tuple[str, tuple[int, ...]]] = {}
    first_rank: dict[str, int] = {}
    for rank, desc in enumerate(descriptions):
        for path, meta in desc.arrays.items():
            known = arrays.setdefault(path, meta)
            first_rank.setdefault(path, rank)
            if known != meta:
                raise PlanError(f"hosts disagree on array {path!r}: rank {first_rank[path]} has dtype {known[0]} "
                                f"and global shape {known[1]}, rank {rank} has {meta[0]} and {meta[1]}")
    infos: dict[PieceId, PieceInfo] = {}
    for rank, desc in enumerate(descriptions):
        for held in desc.pieces:
            piece = held.piece
            known_info = infos.get(piece)
            if known_info is None:
                infos[piece] = PieceInfo(piece, held.shape, held.nbytes, (rank,))
            elif known_info.shape != held.shape:
                raise PlanError(f"hosts hold different shards of {piece[0]!r} at {piece[1]}: {known_info.shape} "
                                f"(rank {known_info.holders[0]}) and {held.shape} (rank {rank})")
            elif rank not in known_info.holders:
                infos[piece] = PieceInfo(piece, held.shape, known_info.nbytes, (*known_info.holders, rank))
    _check_coverage(arrays, infos)
    ordered = infos  # first seen first: rank 0's collection order, then pieces only later ranks hold
    writer = _assign_writers(ordered, len(descriptions), io_rank)
    sizes = {p: i.nbytes for p, i in ordered.items()}
    groups: list[tuple[tuple[PieceId, ...], ...]] = []
    early_counts: list[int] = []
    by_writer: dict[int, list[PieceId]] = {}  # one pass: a scan per rank would be O(hosts^2 x pieces)
    for piece, rank in writer.items():
        by_writer.setdefault(rank, []).append(piece)
    for rank, desc in enumerate(descriptions):
        if io_rank is not None:
            mine = list(ordered) if rank == io_rank else []
            early: list[PieceId] = []  # routed saves upload nothing before the transfer
        else:
            mine = by_writer.get(rank, [])
            early = [p for p in mine if p[0] in desc.early]
        early_set = set(early)
        late = [p for p in mine if p not in early_set]
        early_groups = pack(early, sizes, desc.max_objects)
        groups.append(tuple(tuple(g) for g in early_groups + pack(late, sizes, desc.max_objects)))
        early_counts.append(len(early_groups))
    offsets = tuple(itertools.accumulate((len(g) for g in groups[:-1]), initial=0)) if groups else ()
    return UploadPlan(suffix=descriptions[committer].suffix, committer=committer, io_rank=io_rank,
                    writer=writer, groups=tuple(groups), early=tuple(early_counts), offsets=offsets,
                    total_objects=sum(len(g) for g in groups), pieces=ordered)


def _assign_writers(ordered: Mapping[PieceId, PieceInfo], world_size: int, io_rank: int | None) -> dict[PieceId, int]:
    """Each piece's writer: the io host if it holds it, else the least-loaded holder (largest first)."""
    loads = [0] * world_size
    writer: dict[PieceId, int] = {}
    for info in sorted(ordered.values(), key=lambda i: (-i.nbytes, i.piece)):
        if io_rank is not None and io_rank in info.holders:
            chosen = io_rank
        else:
            chosen = min(info.holders, key=lambda r: (loads[r], r))
        writer[info.piece] = chosen
        loads[chosen] += info.nbytes
    return {p: writer[p] for p in ordered}


def _check_coverage(arrays: Mapping[str, tuple[str, tuple[int, ...]]], infos: Mapping[PieceId, PieceInfo]) -> None:
    """Every array covered exactly once by its distinct boxes (``boxes.partition_problem``: linear)."""
    boxes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {path: [] for path in arrays}
    for (path, start), info in infos.items():
        if path not in boxes:
            raise PlanError(f"a host holds shards of {path!r}, which no host describes as an array")
        shape = arrays[path][1]
        if len(start) != len(shape) or any(s + n > dim for s, n, dim in zip(start, info.shape, shape, strict=True)):
            raise PlanError(f"a shard of {path!r} at {start} of shape {info.shape} lies outside its global "
                            f"shape {shape}")
        if math.prod(info.shape):
            boxes[path].append((start, info.shape))
    for path, found in boxes.items():
        shape = arrays[path][1]
        covered = sum(math.prod(e) for _, e in found) == math.prod(shape)
        if not covered or (len(found) > 1 and partition_problem(shape, found) is not None):
            raise PlanError(f"the hosts' shards of {path!r} do not cover its global shape {shape} exactly once "
                            f"(boxes {sorted(found)[:8]}{'...' if len(found) > 8 else ''}); every element must be "
                            f"held by at least one host, and shards must be disjoint boxes or identical replicas")
