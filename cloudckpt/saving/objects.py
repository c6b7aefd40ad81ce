"""Data objects: which array pieces go into which object, and uploading them.

A *piece* is one contiguous box of an array leaf: an unsharded leaf is one piece at the
origin, a sharded leaf one piece per local shard. Pieces are packed into a few data
objects per host (largest first onto the least-filled object, each object keeping the
collection order), every object named with the one suffix unique to this write
(``<name>.data-0000k-of-0000N.<suffix>``), so no committed index's bytes are ever
touched. Uploading PUTs each object straight from the arrays' memory (a list of views,
never a joined copy) and computes every piece's CRC32C and content hash on the way.

Incremental saves: a piece whose bytes equal a piece of the same key, dtype, box and length
in the base checkpoint (equal XXH3-128, never CRC32C alone) is not uploaded; its record
points at the bytes where the base checkpoint stored them. An object whose pieces were all
reused is not written at all.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.checksum import CRC_BLOCK, crc32c_with_blocks
from cloudckpt.content_hash import content_hash
from cloudckpt.coordination import Coordinator
from cloudckpt.errors import CheckpointFormatError, StorageError
from cloudckpt.format import ArrayEntry, CheckpointIndex, DataObject, data_key, dtype_name
from cloudckpt.graph import ArrayLeaf, Collected, ShardedLeaf
from cloudckpt.index_store import read_index
from cloudckpt.storage import Storage
from cloudckpt.storage.transfer import gather

log = logging.getLogger("cloudckpt.saving")

MiB = 1024 * 1024
#: Aim for data objects of about this size; more objects upload in parallel, but each
#: costs a request and (on S3) a multipart round trip. The storage's own multipart
#: writer parallelises inside one large object, so a handful of objects is enough.
TARGET_OBJECT_SIZE = 256 * MiB

#: One contiguous box of an array leaf, as stored: ``(key path, start in the global array)``.
PieceId = tuple[str, tuple[int, ...]]
#: A piece's CRC32C and its per-block CRC32Cs (``checksum.crc32c_with_blocks``).
PieceCrc = tuple[int, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class PlannedObject:
    """One data object: its key and the pieces it holds, in order, with their offsets."""

    key: str
    pieces: tuple[tuple[PieceId, int], ...]
    size: int


@dataclass(frozen=True, slots=True)
class ObjectPlan:
    """The data objects one host uploads, numbered globally from ``index_offset``.

    In a multi-host save host r's objects follow those of the ranks below it
    (``data-0000k-of-0000N``); on one host ``index_offset`` is 0.
    """

    pieces: Mapping[PieceId, NDArray[Any]]
    objects: tuple[PlannedObject, ...]
    index_offset: int = 0

    @property
    def data_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.objects)


@dataclass(slots=True)
class UploadLog:
    """The data objects a write started uploading: exactly what a failed write must remove."""

    started: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, key: str) -> None:
        with self._lock:
            self.started.add(key)

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self.started)


def pieces_of(entries: Mapping[str, Collected]) -> dict[PieceId, NDArray[Any]]:
    """Every array piece of the collected entries, in collection order."""
    out: dict[PieceId, NDArray[Any]] = {}
    for path, item in entries.items():
        if isinstance(item, ArrayLeaf):
            out[(path, (0,) * item.array.ndim)] = item.array
        elif isinstance(item, ShardedLeaf):
            for start, data in item.shards:
                out[(path, start)] = data
    return out


def pack(pieces: Sequence[PieceId], sizes: Mapping[PieceId, int], max_objects: int) -> list[list[PieceId]]:
    """Group pieces into data objects: largest first onto the least-filled one; each keeps the given order."""
    total = sum(sizes[p] for p in pieces)
    if not pieces:
        return []
    count = max(1, min(max_objects, len(pieces), math.ceil(total / TARGET_OBJECT_SIZE)))
    bins: list[list[PieceId]] = [[] for _ in range(count)]
    fill = [0] * count
    for piece in sorted(pieces, key=lambda p: -sizes[p]):
        i = fill.index(min(fill))
        bins[i].append(piece)
        fill[i] += sizes[piece]
    order = {p: i for i, p in enumerate(pieces)}
    return [sorted(b, key=order.__getitem__) for b in bins if b]


def new_suffix() -> str:
    """The suffix unique to one write (every data object of the write carries it)."""
    return uuid.uuid4().hex[:16]


#: From this many data objects in one save on a store that partitions by key prefix, the
#: objects spread over 256 hashed sub-prefixes. Why there: S3 takes ~3,500 PUT/s per prefix;
#: with 4 requests in flight per host and ~30-100 ms per 32 MiB part, fewer than 64 objects
#: (16 hosts) stay well under it, so small and single-host checkpoints keep the plain layout.
SPREAD_MIN_OBJECTS = 64


def spreads(storage: Storage, total_objects: int) -> bool:
    """Whether a save of ``total_objects`` data objects to ``storage`` spreads them over sub-prefixes."""
    return storage.partitions_by_prefix and total_objects >= SPREAD_MIN_OBJECTS


def plan_objects(name: str, pieces: Mapping[PieceId, NDArray[Any]], groups: Sequence[Sequence[PieceId]], *,
                 suffix: str, index_offset: int, total_objects: int, spread: bool = False) -> ObjectPlan:
    """Name and lay out the objects of already grouped pieces (objects ``index_offset`` + k of ``total_objects``).

    ``spread``: name them under hashed sub-prefixes (``spreads``; the same on every rank).
    """
    objects = []
    for k, group in enumerate(groups):
        offsets = []
        position = 0
        for piece in group:
            offsets.append((piece, position))
            position += int(pieces[piece].nbytes)
        objects.append(PlannedObject(data_key(name, index_offset + k, total_objects, suffix, spread=spread),
                                     tuple(offsets), position))
    return ObjectPlan({p: pieces[p] for group in groups for p in group}, tuple(objects), index_offset)


@dataclass(frozen=True, slots=True)
class StoredPiece:
    """Where one piece's bytes are, by object name (the committer numbers the objects).

    A reused piece names an object of the base checkpoint, with the base's CRC32Cs.
    """

    object: str
    offset: int
    length: int
    crc32c: int
    start: tuple[int, ...]
    shape: tuple[int, ...]
    block_size: int
    block_crc32c: tuple[int, ...]
    hash: str | None


@dataclass(slots=True)
class Uploaded:
    """What an upload stored: every piece's record, the objects written, and the base objects reused."""

    pieces: dict[PieceId, StoredPiece] = field(default_factory=dict)
    objects: list[DataObject] = field(default_factory=list)
    reused: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Uploaded) -> None:
        self.pieces.update(other.pieces)
        self.objects.extend(other.objects)
        self.reused.update(other.reused)

    @property
    def reused_bytes(self) -> int:
        return sum(p.length for p in self.pieces.values() if p.object in self.reused)


def shared_base(coord: Coordinator, storage: Storage, name: str | None, *, root: int,
                url: str) -> BaseCheckpoint | None:
    """The base checkpoint of an incremental save: read once, by rank ``root``, and broadcast.

    Why once: every rank needs it, and N reads of one index at the same moment are what an
    S3 prefix throttles first. A base that is gone or unreadable makes the save a full one
    (logged), on every rank alike.

    Raises:
        CoordinationError: the broadcast failed (nothing was uploaded yet).
    """
    if name is None:
        return None
    index = None
    if coord.rank == root:
        try:
            index = read_index(storage, name)
            if index is None:
                log.info("incremental save of %s: its base %s is gone; saving in full", url, storage.url_for(name))
        except (CheckpointFormatError, StorageError) as exc:
            log.warning("incremental save of %s: cannot read its base %s (%s); saving in full", url,
                        storage.url_for(name), exc)
    if coord.world_size > 1:
        index = coord.broadcast_object(index, src=root)
    return None if index is None else BaseCheckpoint(index)


class BaseCheckpoint:
    """The checkpoint an incremental save may reuse bytes from: its hashed chunks, by box."""

    def __init__(self, index: CheckpointIndex) -> None:
        self.name = index.name
        sizes = {o.name: o.size for o in index.objects}
        self._pieces: dict[PieceId, tuple[str, StoredPiece, int]] = {}
        for path, entry in index.entries.items():
            if not isinstance(entry, ArrayEntry):
                continue
            for c in entry.chunks:
                if c.hash is None or c.length == 0:
                    continue  # checkpoints written without hashes are never reused
                obj = index.objects[c.object].name
                stored = StoredPiece(obj, c.offset, c.length, c.crc32c, c.start, c.shape, c.block_size,
                                     c.block_crc32c, c.hash)
                self._pieces[(path, c.start)] = (entry.dtype, stored, sizes[obj])

    def find(self, piece: PieceId, array: NDArray[Any], digest: str) -> tuple[StoredPiece, int] | None:
        """The base's record of ``piece`` if its bytes are identical (and the base object's size)."""
        known = self._pieces.get(piece)
        if known is None:
            return None
        dtype, stored, size = known
        if (stored.hash != digest or stored.length != array.nbytes or stored.shape != tuple(array.shape)
                or dtype != dtype_name(array.dtype)):
            return None
        return stored, size


def _byte_view(array: NDArray[Any]) -> memoryview:
    return array.reshape(-1).view(np.uint8).data


def upload(storage: Storage, plan: ObjectPlan, which: Sequence[int], log: UploadLog,
           base: BaseCheckpoint | None = None, *, hashes: bool = True) -> Uploaded:
    """PUT the data objects ``which`` in parallel, leaving out pieces ``base`` already holds.

    Each object is marked in ``log`` before its first byte is sent, so a failed write
    removes exactly what it may have left behind (and nothing when nothing was sent).
    ``hashes``: record each piece's content hash (what a later incremental save compares);
    a plain ``Checkpoint.write``/``save``, which no manager bases a save on, skips it.
    """
    hashes = hashes or base is not None
    def one(k: int) -> Uploaded:
        obj = plan.objects[k]
        done = Uploaded()
        views: list[memoryview] = []
        position = 0
        for piece, _ in obj.pieces:
            array = plan.pieces[piece]
            view = _byte_view(array)
            digest = content_hash([view]) if hashes else None
            found = base.find(piece, array, digest) if base is not None and digest is not None else None
            if found is not None:
                done.pieces[piece] = found[0]
                done.reused[found[0].object] = found[1]
                continue
            crc, blocks = crc32c_with_blocks(view)
            done.pieces[piece] = StoredPiece(obj.key, position, view.nbytes, crc, piece[1], tuple(array.shape),
                                             CRC_BLOCK if blocks else 0, blocks, digest)
            views.append(view)
            position += view.nbytes
        if views:
            log.mark(obj.key)
            storage.put(obj.key, views)
            done.objects.append(DataObject(obj.key, position))
        return done

    result = Uploaded()
    if not which:
        return result
    if len(which) == 1:
        return one(which[0])
    workers = min(len(which), storage.config.max_concurrency)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloudckpt-upload") as pool:
        futures = [pool.submit(one, k) for k in which]
        gather(futures, cancel=storage.cancel_transfers)  # Ctrl-C: stop the other objects' parts promptly
        for future in futures:  # in object order: the index lists objects as planned
            result.merge(future.result())
    return result
