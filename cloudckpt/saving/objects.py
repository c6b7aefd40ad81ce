"""Data objects: which array pieces go into which object, and uploading them.

A *piece* is one contiguous box of an array leaf: an unsharded leaf is one piece at the
origin, a sharded leaf one piece per local shard. Pieces are packed into a few data
objects per host (largest first onto the least-filled object, each object keeping the
collection order), every object named with the one suffix unique to this write
(``<name>.data-0000k-of-0000N.<suffix>``), so no committed index's bytes are ever
touched. Uploading PUTs each object straight from the arrays' memory (a list of views,
never a joined copy) and computes every piece's CRC32C and content hash on the way.
A piece in device memory (a ``DeviceArray``: a CUDA tensor in a sync save) is copied by its
copier into a buffer of a bounded ring (``HostRing``) just before its object is checksummed
and PUT, and the buffer is reused once that object is stored: host memory is the ring's,
not the state's, and the copy of one object overlaps the upload of the others in flight.

Incremental saves: a piece whose bytes equal a piece of the same key, dtype, box and length
in the base checkpoint (equal XXH3-128 *and* equal CRC32C, never CRC32C alone) is not
uploaded; its record points at the bytes where the base checkpoint stored them, with the
CRC32Cs and hash of the live bytes (so a base index that lies about them cannot make the new
checkpoint restore other bytes: a restore checks what it reads against the live values). Only
chunks whose objects a listing found, at the size the base index records, are candidates; and
an object whose reused pieces would keep less than ``MIN_REFERENCED_FRACTION`` of it in use is
not referenced at all (its pieces are uploaded again, so the mostly stale object can go). An
object whose pieces were all reused is not written at all.

Why one ~470-line module: every function here answers one question about the data
objects of a save - which pieces go in which object (device arrays cut into row blocks),
under what name, what an incremental save may reuse from its base, and the upload - and
they share the piece/object types. The device copies themselves live in
``cloudckpt.leaves.copier`` (the ring, the batches); only where they plug in is here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

import numpy as np
from numpy.typing import NDArray

from cloudckpt.coordination import Coordinator
from cloudckpt.errors import CheckpointFormatError, StorageError
from cloudckpt.format import ArrayEntry, CheckpointIndex, DataObject, data_key, dtype_name
from cloudckpt.format.content_hash import content_hash
from cloudckpt.format.index_fetch import read_index
from cloudckpt.format.references import listed_sizes
from cloudckpt.leaves.copier import DeviceArray, HostRing, on_host
from cloudckpt.object_graph import ArrayLeaf, Collected, ShardedLeaf
from cloudckpt.storage import Storage
from cloudckpt.storage.checksum import CRC_BLOCK, KnownCrc, crc32c_with_blocks
from cloudckpt.storage.transfer import ChecksummedViews, gather

log = logging.getLogger("cloudckpt.saving")

T = TypeVar("T")

MiB = 1024 * 1024
#: Aim for data objects of about this size; more objects upload in parallel, but each
#: costs a request and (on S3) a multipart round trip. The storage's own multipart
#: writer parallelises inside one large object, so a handful of objects is enough.
TARGET_OBJECT_SIZE = 256 * MiB

#: An incremental save references an earlier data object only while the pieces it reuses from it
#: keep at least this fraction of the object's bytes in use; below that (the object is mostly
#: stale: the rest are bytes that changed since) those pieces are uploaded again, so the old
#: object is deleted once the checkpoints naming it are evicted, instead of a few unchanged bytes
#: keeping a whole old object alive for the rest of the run. Why a quarter: the objects a
#: checkpoint names then hold at most 4x its own bytes, while state that is partly frozen (an
#: embedding, a base model) is still reused whenever it is a sizeable part of the object it is in.
MIN_REFERENCED_FRACTION = 0.25

#: One contiguous box of an array leaf, as stored: ``(key path, start in the global array)``.
PieceId = tuple[str, tuple[int, ...]]
#: A piece's bytes: host memory, or device memory its copier moves through the ring.
Piece = Union[NDArray[Any], DeviceArray]  # noqa: UP007 - runtime alias on 3.10

#: Host buffers of a sync save's ring of device bytes: one object is copied while others are
#: checksummed and uploaded. Each buffer holds one data object's device pieces.
RING_SLOTS = 3


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

    pieces: Mapping[PieceId, Piece]
    objects: tuple[PlannedObject, ...]
    index_offset: int = 0
    #: The ring device pieces stream through (``None``: every piece is in host memory).
    ring: HostRing | None = None

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


def pieces_of(entries: Mapping[str, Collected]) -> dict[PieceId, Piece]:
    """Every array piece of the collected entries, in collection order.

    A device array larger than ``TARGET_OBJECT_SIZE`` becomes several pieces of whole rows
    (chunks of one entry, as a sharded array's are), so the ring buffers it streams through
    stay near an object's size whatever the largest tensor (a host array stays one piece).
    """
    out: dict[PieceId, Piece] = {}
    for path, item in entries.items():
        boxes = [((0,) * item.array.ndim, item.array)] if isinstance(item, ArrayLeaf) else \
            list(item.shards) if isinstance(item, ShardedLeaf) else []
        for start, data in boxes:
            for at, piece in _row_blocks(start, data):
                out[(path, at)] = piece
    return out


def _row_blocks(start: tuple[int, ...], data: Piece) -> list[tuple[tuple[int, ...], Piece]]:
    """``data`` at ``start``, or a large device array cut into blocks of rows of about an object each."""
    if not isinstance(data, DeviceArray) or data.nbytes <= TARGET_OBJECT_SIZE or data.ndim == 0 or data.shape[0] < 2:
        return [(start, data)]
    step = max(1, TARGET_OBJECT_SIZE // max(1, data.nbytes // data.shape[0]))
    blocks: list[tuple[tuple[int, ...], Piece]] = []
    for row in range(0, data.shape[0], step):
        block = data.rows(row, min(row + step, data.shape[0]))
        if block is None:
            return [(start, data)]
        blocks.append(((start[0] + row, *start[1:]), block))
    return blocks


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


def plan_objects(name: str, pieces: Mapping[PieceId, Piece], groups: Sequence[Sequence[PieceId]], *,
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
    mine = {p: pieces[p] for group in groups for p in group}
    device = next((a for a in mine.values() if isinstance(a, DeviceArray)), None)
    ring = None if device is None else HostRing(device.copier, RING_SLOTS)
    return ObjectPlan(mine, tuple(objects), index_offset, ring)


def host_pieces(plan: ObjectPlan, k: int) -> contextlib.AbstractContextManager[Mapping[PieceId, NDArray[Any]]]:
    """Object ``k``'s pieces in host memory for the block (device ones through the plan's ring)."""
    return on_host(plan.pieces, [piece for piece, _ in plan.objects[k].pieces], plan.ring)


@dataclass(frozen=True, slots=True)
class StoredPiece:
    """Where one piece's bytes are, by object name (the committer numbers the objects).

    A reused piece names an object of the base checkpoint (or one it references), with the
    CRC32Cs and hash of the live bytes - equal to what the base records, or it is not reused.
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
    """The base checkpoint of an incremental save: read and checked once, by rank ``root``, and broadcast.

    Why once: every rank needs it, and N reads of one index at the same moment are what an
    S3 prefix throttles first. The data objects its reusable chunks are in are listed
    (``BaseCheckpoint.confirm``): one that is gone, or not of the size the index records, is
    not referenced - its pieces are uploaded again. A base that is gone or unreadable (or
    cannot be listed) makes the save a full one (logged), on every rank alike.

    Raises:
        CoordinationError: the broadcast failed (nothing was uploaded yet).
    """
    if name is None:
        return None
    base = None
    if coord.rank == root:
        try:
            index = read_index(storage, name)
            if index is None:
                log.info("incremental save of %s: its base %s is gone; saving in full", url, storage.url_for(name))
            else:
                base = BaseCheckpoint(index)
                base.confirm(storage)
        except (CheckpointFormatError, StorageError) as exc:
            base = None
            log.warning("incremental save of %s: cannot read its base %s (%s); saving in full", url,
                        storage.url_for(name), exc)
    if coord.world_size > 1:
        base = coord.broadcast_object(base, src=root)
    return base


def unconfirmed_objects(storage: Storage, recorded: Mapping[str, int]) -> dict[str, str]:
    """Those of the data objects ``recorded`` (name -> the size an index records) that a listing
    (``references.listed_sizes``) finds gone or of another size, each with what is wrong."""
    listed = listed_sizes(storage, recorded)
    return {name: "gone" if name not in listed else f"{listed[name]} bytes, the index says {size}"
            for name, size in recorded.items() if listed.get(name) != size}


def shown_objects(storage: Storage, problems: Mapping[str, str]) -> str:
    """Up to four of ``unconfirmed_objects``' findings, as ``url (what is wrong)``, for a message."""
    shown = ", ".join(f"{storage.url_for(name)} ({why})" for name, why in sorted(problems.items())[:4])
    return shown + (", ..." if len(problems) > 4 else "")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a live piece's bytes are: its CRC32C, per-block CRC32Cs and (managed saves) content hash."""

    crc32c: int
    block_crc32c: tuple[int, ...]
    hash: str | None


def fingerprint(array: NDArray[Any], hashes: bool) -> Fingerprint:
    """One pass of CRC32C (and, with ``hashes``, one of XXH3-128) over a piece's bytes."""
    view = _byte_view(array)
    crc, blocks = crc32c_with_blocks(view)
    return Fingerprint(crc, blocks, content_hash([view]) if hashes else None)


def _record(obj: str, offset: int, array: Piece, start: tuple[int, ...], found: Fingerprint) -> StoredPiece:
    """A piece's record: where its bytes are, with the live bytes' checksums and hash."""
    return StoredPiece(obj, offset, int(array.nbytes), found.crc32c, start, tuple(array.shape),
                       CRC_BLOCK if found.block_crc32c else 0, found.block_crc32c, found.hash)


class BaseCheckpoint:
    """The checkpoint an incremental save may reuse bytes from: its hashed chunks, by box.

    Attributes:
        name: the base checkpoint's name.
        sizes: the size of each data object a reusable chunk is in (as recorded, and as
            listed once ``confirm`` ran).
    """

    def __init__(self, index: CheckpointIndex) -> None:
        self.name = index.name
        recorded = {o.name: o.size for o in index.objects}
        self.sizes: dict[str, int] = {}
        self._pieces: dict[PieceId, tuple[str, StoredPiece]] = {}
        for path, entry in index.entries.items():
            if not isinstance(entry, ArrayEntry):
                continue
            for c in entry.chunks:
                if c.hash is None or c.length == 0:
                    continue  # checkpoints written without hashes are never reused
                obj = index.objects[c.object].name
                self.sizes[obj] = recorded[obj]
                self._pieces[(path, c.start)] = (entry.dtype, StoredPiece(
                    obj, c.offset, c.length, c.crc32c, c.start, c.shape, c.block_size, c.block_crc32c, c.hash))

    def confirm(self, storage: Storage) -> None:
        """List the objects of the reusable chunks; forget the chunks of any missing or resized one.

        Raises:
            StorageError: the listing failed.
        """
        wrong = unconfirmed_objects(storage, self.sizes)
        if not wrong:
            return
        log.warning("checkpoint %s names data object(s) that are gone or changed: %s - it cannot be restored "
                    "intact; this save uploads those pieces again instead of referencing them",
                    storage.url_for(self.name), shown_objects(storage, wrong))
        self._pieces = {p: known for p, known in self._pieces.items() if known[1].object not in wrong}
        self.sizes = {name: size for name, size in self.sizes.items() if name not in wrong}

    def _find(self, piece: PieceId, array: Piece, found: Fingerprint) -> StoredPiece | None:
        """The record reusing the base's bytes of ``piece`` if they are recorded identical to ``array``'s."""
        known = self._pieces.get(piece)
        if known is None or found.hash is None:
            return None
        dtype, stored = known
        if (stored.hash != found.hash or stored.crc32c != found.crc32c or stored.length != array.nbytes
                or stored.shape != tuple(array.shape) or dtype != dtype_name(array.dtype)):
            return None
        return _record(stored.object, stored.offset, array, piece[1], found)

    def reuse(self, pieces: Mapping[PieceId, Piece],
              found: Mapping[PieceId, Fingerprint]) -> dict[PieceId, StoredPiece]:
        """The records of those ``found`` pieces that reference the base's bytes instead of being uploaded.

        A piece is reused when the base records identical bytes for it (``_find``) in an
        object these pieces keep at least ``MIN_REFERENCED_FRACTION`` of in use. Decided over
        the pieces of one ``upload`` call - one host's, not the whole job's: an object other
        hosts reuse too may be rewritten where the job as a whole keeps more of it in use, never
        referenced where less is.
        """
        matched = {p: record for p, f in found.items() if (record := self._find(p, pieces[p], f)) is not None}
        used: dict[str, int] = {}
        for record in matched.values():
            used[record.object] = used.get(record.object, 0) + record.length
        stale = {name for name, n in used.items() if n < MIN_REFERENCED_FRACTION * self.sizes[name]}
        for name in sorted(stale):
            log.debug("not referencing %s (%d of its %d bytes still in use): uploading those pieces again",
                      name, used[name], self.sizes[name])
        return {p: record for p, record in matched.items() if record.object not in stale}


def _byte_view(array: NDArray[Any]) -> memoryview:
    return array.reshape(-1).view(np.uint8).data


def upload(storage: Storage, plan: ObjectPlan, which: Sequence[int], log: UploadLog,
           base: BaseCheckpoint | None = None, *, hashes: bool = True) -> Uploaded:
    """PUT the data objects ``which`` in parallel, leaving out pieces ``base`` already holds.

    Each object is marked in ``log`` before its first byte is sent, so a failed write
    removes exactly what it may have left behind (and nothing when nothing was sent).
    ``hashes``: record each piece's content hash (what a later incremental save compares);
    a plain ``Checkpoint.write``/``save``, which no manager bases a save on, skips it.

    With a ``base``, every piece is fingerprinted before any object is written, because
    whether a base object is worth referencing depends on all the pieces reusing it
    (``BaseCheckpoint.reuse``); without one, each object is fingerprinted and written in turn.
    """
    hashes = hashes or base is not None

    def fingerprints(k: int) -> dict[PieceId, Fingerprint]:
        with host_pieces(plan, k) as arrays:
            return {piece: fingerprint(arrays[piece], hashes) for piece, _ in plan.objects[k].pieces}

    def put(k: int, found: Mapping[PieceId, Fingerprint] | None, reused: Mapping[PieceId, StoredPiece]) -> Uploaded:
        with host_pieces(plan, k) as arrays:
            return put_host(k, arrays, found if found is not None else {
                piece: fingerprint(arrays[piece], hashes) for piece, _ in plan.objects[k].pieces}, reused)

    def put_host(k: int, arrays: Mapping[PieceId, NDArray[Any]], found: Mapping[PieceId, Fingerprint],
                 reused: Mapping[PieceId, StoredPiece]) -> Uploaded:
        obj = plan.objects[k]
        done = Uploaded()
        views: list[memoryview] = []
        known: list[KnownCrc] = []
        position = 0
        for piece, _ in obj.pieces:
            record = reused.get(piece)
            if record is not None:
                assert base is not None
                done.pieces[piece] = record
                done.reused[record.object] = base.sizes[record.object]
                continue
            array = arrays[piece]
            record = done.pieces[piece] = _record(obj.key, position, array, piece[1], found[piece])
            views.append(_byte_view(array))
            # What the index records of these bytes, for the store's checksums (no second data pass).
            known.append(KnownCrc(record.offset, record.length, record.crc32c, record.block_size, record.block_crc32c))
            position += int(array.nbytes)
        if views:
            log.mark(obj.key)
            storage.put(obj.key, ChecksummedViews(views, known))  # the store's checksums reuse the index's
            done.objects.append(DataObject(obj.key, position))
        return done

    if base is None:
        parts = _each(storage, which, lambda k: put(k, None, {}))
    else:
        found: dict[PieceId, Fingerprint] = {}
        for part in _each(storage, which, fingerprints):
            found.update(part)
        reused = base.reuse(plan.pieces, found)
        parts = _each(storage, which, lambda k: put(k, found, reused))
    result = Uploaded()
    for uploaded in parts:  # in object order: the index lists objects as planned
        result.merge(uploaded)
    return result


def _each(storage: Storage, which: Sequence[int], work: Callable[[int], T]) -> list[T]:
    """``work(k)`` for every object number in ``which``, in parallel; the results in that order."""
    if len(which) <= 1:
        return [work(k) for k in which]
    workers = min(len(which), storage.config.max_concurrency)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloudckpt-upload") as pool:
        futures = [pool.submit(work, k) for k in which]
        gather(futures, cancel=storage.cancel_transfers)  # Ctrl-C: stop the other objects' parts promptly
        return [future.result() for future in futures]
