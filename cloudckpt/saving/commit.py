"""The commit point of a save, and what happens around it.

``commit`` makes a checkpoint visible with one PUT of its index, conditional on what the
writer saw there before it uploaded anything (absent -> create-if-absent, present ->
replace-if-unchanged); ``delete_replaced`` then removes the data objects of the index it
replaced; ``discard`` removes a failed write's own data objects. A crash before the commit
leaves unreferenced data (cleaned up later, ``cloudckpt.manager.cleanup``) and no index a
reader would accept; a crash after it leaves a complete checkpoint. ``number_objects``
and ``assemble_index`` build the index from what the ranks stored. These are the
functions; ``saving.committer.Committer`` is the step every save path drives with them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from cloudckpt.errors import (
    CheckpointFormatError,
    ConcurrentWriterError,
    NotFoundError,
    PreconditionError,
    SaveError,
    StorageError,
)
from cloudckpt.format import (
    ArrayEntry,
    CheckpointIndex,
    Chunk,
    DataObject,
    Entry,
    decode_index,
    dtype_name,
    encode_index,
    index_key,
    object_checkpoint,
)
from cloudckpt.format.index_fetch import read_index
from cloudckpt.format.references import delete_unreferenced
from cloudckpt.object_graph import ArrayLeaf, Collected, ShardedLeaf
from cloudckpt.saving.objects import PieceId, StoredPiece, shown_objects, unconfirmed_objects
from cloudckpt.storage import ObjectMeta, Storage, UpdateVersion, WriteMode

log = logging.getLogger("cloudckpt.saving")


def number_objects(written: Sequence[DataObject], reused: Mapping[str, int],
                   pieces: Mapping[PieceId, StoredPiece]) -> tuple[tuple[DataObject, ...], dict[PieceId, Chunk]]:
    """The index's object list and every stored piece's chunk, numbered into it.

    The list is the objects this save wrote (``written``, in plan order: ``data-0000k``
    numbering) followed by the earlier checkpoints' objects an incremental save references
    (``reused``: name -> size, sorted by name), so every rank's pieces number alike.
    """
    objects = (*written, *(DataObject(name, size) for name, size in sorted(reused.items())))
    number = {o.name: k for k, o in enumerate(objects)}
    chunks = {piece: Chunk(number[p.object], p.offset, p.length, p.crc32c, p.start, p.shape, p.block_size,
                           p.block_crc32c, p.hash) for piece, p in pieces.items()}
    return objects, chunks


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


def commit(storage: Storage, index: CheckpointIndex, seen: ObjectMeta | None) -> tuple[int, str | None, list[str]]:
    """Make the checkpoint visible: one PUT of the index, conditional on ``seen``.

    ``seen`` is what the writer found at the index before it started uploading (absent ->
    create-if-absent; present -> replace-if-unchanged).

    The encoded index is decoded back once with the validator readers use before it is
    PUT: a bug upstream (a rank's pieces missing from the index, an array left without
    chunks) then fails the save instead of committing a checkpoint no reader accepts.

    Returns the index size, its version (ETag/generation) and the data objects of the
    index it replaced that the new one does not name; the caller deletes those
    (``delete_replaced``) once the commit stands.

    Before the PUT, the data objects of earlier checkpoints the index names (an incremental
    save's reused bytes) are listed: each must still exist at the size the index records.

    Raises:
        CheckpointFormatError: the index would not decode (nothing is committed).
        ConcurrentWriterError: the index changed (or appeared) since ``seen`` - another
            writer is saving to the same path. Nothing of theirs is touched.
        SaveError: an object of an earlier checkpoint the index names is gone or resized.
    """
    key = index_key(index.name)
    url = storage.url_for(key)
    data = encode_index(index)
    decode_index(data, index.name, url)  # never commit what a reader refuses
    replaced = _objects_named_by(storage, index.name, seen) if seen is not None else []
    _confirm_earlier_objects(storage, index, replaced)
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


def _confirm_earlier_objects(storage: Storage, index: CheckpointIndex, replaced: Collection[str]) -> None:
    """Check, by listing, that the objects of earlier checkpoints ``index`` names exist at their recorded size.

    Those are the objects of the checkpoints it references, and those of the index it
    replaces that it still names (an incremental save to its own base's name). Why at every
    commit, though the base's objects were listed when the save began: objects can vanish
    while a manager runs (a lifecycle rule, someone cleaning up), and an index naming a gone
    object is a checkpoint that can never be restored. Costs one LIST per referenced
    checkpoint (per 1,000 of its objects); nothing when the index names no earlier object.

    Raises:
        SaveError: one is gone or has another size (nothing is committed).
    """
    earlier = set(replaced)
    named = {o.name: o.size for o in index.objects if object_checkpoint(o.name) != index.name or o.name in earlier}
    wrong = unconfirmed_objects(storage, named)  # no LIST when it names none
    if wrong:
        raise SaveError(f"{storage.url_for(index_key(index.name))} was not committed: data object(s) of earlier "
                        f"checkpoints it would reference are gone or changed since the save began: "
                        f"{shown_objects(storage, wrong)}. The next incremental save uploads those pieces again")


def _objects_named_by(storage: Storage, name: str, seen: ObjectMeta) -> list[str]:
    """Data objects of the index we are about to replace (only what it names, never a listing)."""
    try:
        current = read_index(storage, name, seen)
    except (CheckpointFormatError, StorageError) as exc:
        log.warning("not deleting the data of the replaced %s: %s", storage.url_for(index_key(name)), exc)
        return []
    return [] if current is None else [o.name for o in current.objects]


def delete_replaced(storage: Storage, name: str, stale: Sequence[str]) -> None:
    """Delete the data objects of a replaced index (after the new one is committed) that no
    committed index still names (an incremental checkpoint may reference them)."""
    if not stale:
        return
    try:
        delete_unreferenced(storage, stale)
    except (StorageError, CheckpointFormatError) as exc:
        log.warning("could not delete %d data object(s) of the replaced %s: %s", len(stale),
                    storage.url_for(index_key(name)), exc)


def discard(storage: Storage, name: str, started: Collection[str]) -> None:
    """Best-effort removal of a failed write's data objects (``started``: those it began uploading).

    If the failure hid a successful commit (the index PUT landed but its response was
    lost), the index at the path names our objects: then they are kept. Nothing is
    logged when nothing was uploaded (a missing bucket, refused credentials).
    """
    ours = set(started)
    if not ours:
        return
    try:
        current = read_index(storage, name)
        if current is not None and ours & {o.name for o in current.objects}:
            log.warning("keeping the data of %s: its index was committed despite the error", storage.url_for(name))
            return
    except Exception:
        pass  # unreadable or unreachable: our objects are still ours to remove
    try:
        storage.delete(sorted(ours))
    except Exception as exc:
        log.warning("a failed save of %s left %d data object(s) behind (%s): %s - a manager's next save or "
                    "`cloudckpt gc` removes them once they are old enough", storage.url_for(name), len(ours),
                    ", ".join(sorted(ours)[:4]) + (", ..." if len(ours) > 4 else ""), exc)
