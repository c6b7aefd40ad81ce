"""Writing a checkpoint: plan data objects, upload them, then commit the index.

The call order is fixed, and every step is what makes a crash harmless::

    plan_write  -> leaves packed into a few data objects, each named with a suffix
                   unique to this write (so no committed index's bytes are ever touched)
    upload      -> each data object PUT from the arrays' own memory (zero copy),
                   in parallel; CRC32C of every leaf computed on the way
    commit      -> HEAD the index; PUT it conditionally on what was seen (absent ->
                   create-if-absent, present -> replace-if-unchanged); only now is the
                   checkpoint visible; then delete the data objects the replaced index named
    discard     -> on any failure before the commit: delete what this write uploaded

A crash before the commit leaves unreferenced data objects (cleaned up later by the
manager) and no index a reader would accept; a crash after it leaves a complete one.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.checksum import CRC_BLOCK, crc32c_with_blocks
from cloudckpt.crashpoints import crash_point
from cloudckpt.errors import (
    CheckpointFormatError,
    ConcurrentWriterError,
    NotFoundError,
    PreconditionError,
    StorageError,
)
from cloudckpt.format import (
    ArrayEntry,
    CheckpointIndex,
    Chunk,
    DataObject,
    Entry,
    data_key,
    decode_index,
    dtype_name,
    encode_index,
    index_key,
)
from cloudckpt.graph import ArrayLeaf, Collected, ShardedLeaf
from cloudckpt.storage import ObjectMeta, Storage, UpdateVersion, WriteMode
from cloudckpt.storage.transfer import gather

log = logging.getLogger("cloudckpt.writer")

MiB = 1024 * 1024
#: Aim for data objects of about this size; more objects upload in parallel, but each
#: costs a request and (on S3) a multipart round trip. The storage's own multipart
#: writer parallelises inside one large object, so a handful of objects is enough.
TARGET_OBJECT_SIZE = 256 * MiB


#: One contiguous box of an array leaf, as stored: ``(key path, start in the global array)``.
#: An unsharded leaf is one piece starting at the origin; a sharded leaf has one per shard.
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
class WritePlan:
    """What one write (of one host) will upload. ``first`` objects hold the pieces asked for first.

    ``index_offset`` is the global number of this plan's first object: in a multi-host
    save each host's objects are numbered after the lower ranks' (``data-0000k-of-0000N``).
    """

    name: str
    entries: Mapping[str, Collected]
    pieces: Mapping[PieceId, NDArray[Any]]
    objects: tuple[PlannedObject, ...]
    first: int
    index_offset: int = 0

    def array(self, piece: PieceId) -> NDArray[Any]:
        return self.pieces[piece]

    @property
    def data_bytes(self) -> int:
        return sum(o.size for o in self.objects)


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


def _pack(pieces: Sequence[PieceId], sizes: Mapping[PieceId, int], max_objects: int) -> list[list[PieceId]]:
    """Largest first onto the least-filled bin; each bin keeps the collection order."""
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


def object_groups(pieces: Mapping[PieceId, NDArray[Any]], *, max_objects: int,
                  first: Collection[str] = ()) -> tuple[list[list[PieceId]], int]:
    """The pieces grouped into data objects, and how many groups hold the ``first`` key paths."""
    sizes = {p: int(a.nbytes) for p, a in pieces.items()}
    early = [p for p in pieces if p[0] in first]
    late = [p for p in pieces if p[0] not in first]
    early_groups = _pack(early, sizes, max_objects)
    return early_groups + _pack(late, sizes, max_objects), len(early_groups)


def new_suffix() -> str:
    """The suffix unique to one write (every data object of the write carries it)."""
    return uuid.uuid4().hex[:16]


def plan_objects(name: str, entries: Mapping[str, Collected], pieces: Mapping[PieceId, NDArray[Any]],
                 groups: Sequence[Sequence[PieceId]], first: int, *, suffix: str, index_offset: int = 0,
                 total_objects: int | None = None) -> WritePlan:
    """A plan from already grouped pieces, its objects numbered from ``index_offset`` of ``total_objects``."""
    total = len(groups) if total_objects is None else total_objects
    objects = []
    for k, group in enumerate(groups):
        offsets = []
        position = 0
        for piece in group:
            offsets.append((piece, position))
            position += int(pieces[piece].nbytes)
        objects.append(PlannedObject(data_key(name, index_offset + k, total, suffix), tuple(offsets), position))
    return WritePlan(name, entries, pieces, tuple(objects), first, index_offset)


def plan_write(name: str, entries: Mapping[str, Collected], *, max_objects: int,
               first: Collection[str] = ()) -> WritePlan:
    """Assign every array piece to a data object; leaves in ``first`` get objects of their own.

    Why ``first``: an async save whose state exceeds its staging budget uploads those
    leaves from live memory before returning, and the rest in the background.
    """
    pieces = pieces_of(entries)
    groups, first_count = object_groups(pieces, max_objects=max_objects, first=first)
    return plan_objects(name, entries, pieces, groups, first_count, suffix=new_suffix())


def _byte_view(array: NDArray[Any]) -> memoryview:
    return array.reshape(-1).view(np.uint8).data


def upload(storage: Storage, plan: WritePlan, which: Sequence[int]) -> dict[PieceId, PieceCrc]:
    """PUT the data objects ``which`` in parallel; return the CRC32C of each of their pieces."""
    def one(k: int) -> dict[PieceId, PieceCrc]:
        obj = plan.objects[k]
        views = [_byte_view(plan.array(piece)) for piece, _ in obj.pieces]
        crcs = {piece: crc32c_with_blocks(view) for (piece, _), view in zip(obj.pieces, views, strict=True)}
        storage.put(obj.key, views)
        return crcs

    result: dict[PieceId, PieceCrc] = {}
    if not which:
        return result
    if len(which) == 1:
        return one(which[0])
    workers = min(len(which), storage.config.max_concurrency)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloudckpt-upload") as pool:
        futures = [pool.submit(one, k) for k in which]
        gather(futures, cancel=storage.cancel_transfers)  # Ctrl-C: stop the other uploads at their next part
        for future in futures:
            result.update(future.result())
    return result


def locate(plan: WritePlan, crcs: Mapping[PieceId, PieceCrc]) -> dict[PieceId, Chunk]:
    """Where each piece of ``plan`` landed: a chunk naming the (global) object number."""
    out: dict[PieceId, Chunk] = {}
    for k, obj in enumerate(plan.objects):
        for piece, offset in obj.pieces:
            array = plan.array(piece)
            crc, blocks = crcs[piece]
            out[piece] = Chunk(plan.index_offset + k, offset, int(array.nbytes), crc, piece[1], tuple(array.shape),
                               CRC_BLOCK if blocks else 0, blocks)
    return out


def build_index(plan: WritePlan, crcs: Mapping[PieceId, PieceCrc],
                metadata: Mapping[str, Any] | None) -> CheckpointIndex:
    """The index naming every piece's object, offset, length and CRC32C (one host wrote everything)."""
    objects = tuple(DataObject(o.key, o.size) for o in plan.objects)
    return assemble_index(plan.name, plan.entries, objects, locate(plan, crcs), metadata)


def assemble_index(name: str, entries: Mapping[str, Collected], objects: Sequence[DataObject],
                   chunks: Mapping[PieceId, Chunk], metadata: Mapping[str, Any] | None) -> CheckpointIndex:
    """The index from the tree (``entries``) and where every piece of every host landed (``chunks``).

    Array leaves take their chunks from ``chunks`` by key path, so a sharded array's
    chunks may come from pieces other hosts wrote.
    """
    by_path: dict[str, list[Chunk]] = {}
    for (path, _), chunk in chunks.items():
        by_path.setdefault(path, []).append(chunk)
    out: dict[str, Entry] = {}
    for path, item in entries.items():
        if isinstance(item, (ArrayLeaf, ShardedLeaf)):
            array_chunks = sorted(by_path.get(path, []), key=lambda c: c.start)
            if isinstance(item, ArrayLeaf):
                dtype, shape = item.array.dtype, tuple(item.array.shape)
            else:
                dtype, shape = item.dtype, item.shape
            out[path] = ArrayEntry(dtype_name(dtype), shape, item.pytype, tuple(array_chunks))
        else:
            out[path] = item
    return CheckpointIndex(name, out, tuple(objects), dict(metadata or {}))


def head_index(storage: Storage, name: str) -> ObjectMeta | None:
    """The index of checkpoint ``name`` as it is now, or ``None`` if absent."""
    try:
        return storage.head(index_key(name))
    except NotFoundError:
        return None


def commit(storage: Storage, index: CheckpointIndex, seen: ObjectMeta | None) -> tuple[int, str | None, list[str]]:
    """Make the checkpoint visible: one PUT of the index, conditional on ``seen``.

    ``seen`` is what the writer found at the index before it started uploading (absent ->
    create-if-absent; present -> replace-if-unchanged).

    Returns the index size, its version (ETag/generation) and the data objects of the
    index it replaced that the new one does not name; the caller deletes those
    (``delete_replaced``) once the commit stands.

    Raises:
        ConcurrentWriterError: the index changed (or appeared) since ``seen`` - another
            writer is saving to the same path. Nothing of theirs is touched.
    """
    key = index_key(index.name)
    url = storage.url_for(key)
    data = encode_index(index)
    replaced = _objects_named_by(storage, key, index.name) if seen is not None else []
    if not storage.supports_conditional_writes:
        written = storage.put(key, data)
    else:
        mode: WriteMode = "create" if seen is None else UpdateVersion(seen.version or "")
        try:
            written = storage.put(key, data, mode=mode)
        except (PreconditionError, NotFoundError) as exc:
            raise ConcurrentWriterError(
                f"another writer changed {url} while this save was committing; this save was not "
                f"committed and the other writer's checkpoint was left alone") from exc
    ours = {o.name for o in index.objects}
    return len(data), written.version, [name for name in replaced if name not in ours]


def delete_replaced(storage: Storage, name: str, stale: Sequence[str]) -> None:
    """Delete the data objects of a replaced index (after the new one is committed)."""
    if not stale:
        return
    try:
        storage.delete(stale)
    except StorageError as exc:
        log.warning("could not delete %d data object(s) of the replaced %s: %s", len(stale),
                    storage.url_for(index_key(name)), exc)


def _objects_named_by(storage: Storage, key: str, name: str) -> list[str]:
    """Data objects of the index we are about to replace (only what it names, never a listing)."""
    try:
        return [o.name for o in decode_index(storage.get(key), name, storage.url_for(key)).objects]
    except (CheckpointFormatError, NotFoundError) as exc:
        log.warning("not deleting the data of the replaced %s: %s", storage.url_for(key), exc)
        return []


def discard(storage: Storage, plan: WritePlan) -> None:
    """Best-effort removal of this write's data objects after a failure.

    If the failure hid a successful commit (the index PUT landed but its response was
    lost), the index at the path names our objects: then they are kept.
    """
    ours = {o.key for o in plan.objects}
    if not ours:
        return
    try:
        current = decode_index(storage.get(index_key(plan.name)), plan.name, storage.url_for(plan.name))
        if ours & {o.name for o in current.objects}:
            log.warning("keeping the data of %s: its index was committed despite the error",
                        storage.url_for(plan.name))
            return
    except Exception:
        pass
    try:
        storage.delete(sorted(ours))
    except Exception as exc:
        log.warning("could not remove the data objects of a failed save of %s: %s",
                    storage.url_for(plan.name), exc)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a committed write stored.

    Attributes:
        name: the checkpoint's name (relative to its directory).
        bytes: bytes stored (data objects and index).
        objects: objects stored (data objects and index).
        index_version: the committed index's version (ETag / generation), so a manager
            that must undo this write deletes the index only if it is still ours.
        data_keys: this write's data objects.
    """

    name: str
    bytes: int
    objects: int
    index_version: str | None
    data_keys: tuple[str, ...]


def write_checkpoint(storage: Storage, plan: WritePlan, metadata: Mapping[str, Any] | None = None, *,
                     crcs: Mapping[PieceId, PieceCrc] | None = None, skip: int = 0) -> WriteResult:
    """Upload ``plan``'s objects from ``skip`` on (``crcs`` has those before), then commit.

    On any failure the data objects of this write are deleted and the error re-raised.
    """
    try:
        # HEAD the index *before* uploading: an index another writer commits while our bytes
        # are in flight then makes our conditional commit fail, instead of being replaced.
        seen = head_index(storage, plan.name)
        all_crcs = dict(crcs or {})
        all_crcs.update(upload(storage, plan, range(skip, len(plan.objects))))
        crash_point("after_data_upload")
        index_size, version, stale = commit(storage, build_index(plan, all_crcs, metadata), seen)
    except BaseException:
        discard(storage, plan)
        raise
    crash_point("after_index_write")
    delete_replaced(storage, plan.name, stale)
    return WriteResult(plan.name, plan.data_bytes + index_size, len(plan.objects) + 1, version,
                       tuple(o.key for o in plan.objects))
