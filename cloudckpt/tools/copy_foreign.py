"""``cp`` of a foreign checkpoint (torch DCP's layout, Orbax, ...): converted into cloudckpt's format.

The order is a save's, so an interrupted conversion is harmless::

    check    -> the destination index must be absent, unless ``force``
    plan     -> every piece (``conversion.Conversion``: key path, box, size) is known from the
                source's metadata before a byte is read; pieces are packed in order into data
                objects of about ``OBJECT_BYTES`` (a larger piece alone), named write-unique
    data     -> one object at a time: its pieces are loaded through the source's reader,
                CRC32C'd (per piece and per 1 MiB block, as a save does) and PUT
    re-read  -> the written objects are read back and every chunk's CRC32C checked
                (``verify.verify_data``); skipped without ``reread``
    commit   -> the index, last, conditional (``saving.commit``): only now does the copy exist

Memory: one data object's pieces at a time - ``OBJECT_BYTES``, or the largest piece (one
tensor chunk) when that is larger. A failure before the commit removes what was written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from cloudckpt.errors import AlreadyExistsError, CheckpointFormatError, ChecksumError, StorageError
from cloudckpt.format import CheckpointIndex, DataObject, data_key, index_key, parse_dtype
from cloudckpt.format.index_fetch import head_index
from cloudckpt.format.references import delete_unreferenced
from cloudckpt.format.sniff import ForeignCheckpoint
from cloudckpt.leaves.base import ShardedLeaf
from cloudckpt.object_graph import Collected
from cloudckpt.saving.commit import assemble_index, commit, delete_replaced, number_objects
from cloudckpt.saving.objects import PieceId, StoredPiece, fingerprint, new_suffix
from cloudckpt.storage import ObjectMeta, Storage
from cloudckpt.storage.checksum import CRC_BLOCK
from cloudckpt.tools.conversion import Conversion, Piece, conversion_of
from cloudckpt.tools.progress import ProgressFactory, reporting
from cloudckpt.tools.verify import verify_data

log = logging.getLogger("cloudckpt.tools")

#: Bytes of pieces packed into one data object (and so held in memory at once, unless one piece is larger).
OBJECT_BYTES = 64 * 1024 * 1024


def pack_pieces(pieces: Sequence[Piece], limit: int = OBJECT_BYTES) -> list[list[Piece]]:
    """Consecutive pieces grouped into objects of at most ``limit`` bytes (a larger piece alone)."""
    groups: list[list[Piece]] = []
    size = 0
    for piece in pieces:
        if not groups or (size + piece.nbytes > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece.nbytes
    return groups


def _entries(conversion: Conversion) -> dict[str, Collected]:
    entries: dict[str, Collected] = dict(conversion.nodes)
    entries.update(conversion.values)
    for piece in conversion.pieces:
        if piece.path not in entries:
            entries[piece.path] = ShardedLeaf(piece.shape, parse_dtype(piece.dtype), piece.pytype, ())
    return entries


def _write_object(dst: Storage, key: str, group: Sequence[Piece]) -> tuple[DataObject, dict[PieceId, StoredPiece]]:
    """Load ``group``'s pieces, checksum them and PUT them as one object."""
    views = []
    stored: dict[PieceId, StoredPiece] = {}
    position = 0
    for piece in group:
        array = piece.load()
        if tuple(array.shape) != piece.box or array.nbytes != piece.nbytes:
            raise CheckpointFormatError(f"{piece.path}: the source gave {list(array.shape)} "
                                        f"({array.nbytes} bytes) for a box of {list(piece.box)}")
        found = fingerprint(array, True)
        stored[(piece.path, piece.start)] = StoredPiece(
            key, position, int(array.nbytes), found.crc32c, piece.start, piece.box,
            CRC_BLOCK if found.block_crc32c else 0, found.block_crc32c, found.hash)
        views.append(array.reshape(-1).view("uint8").data)
        position += int(array.nbytes)
    dst.put(key, views)
    return DataObject(key, position), stored


def convert_foreign(foreign: ForeignCheckpoint, dst: Storage, dst_name: str, *, force: bool, reread: bool,
                    progress: ProgressFactory) -> tuple[int, int]:
    """Write ``foreign`` as the cloudckpt checkpoint ``dst_name`` in ``dst``; the index last.

    Returns the data objects and bytes written.

    Raises:
        AlreadyExistsError: the destination exists and not ``force``.
        ChecksumError: the written copy reads back wrong (nothing committed).
        CheckpointFormatError: the source does not read as its metadata says (nothing committed).
    """
    seen = claim_destination(dst, dst_name, force=force)
    try:
        conversion = conversion_of(foreign)
    except ValueError as exc:
        raise CheckpointFormatError(f"{foreign.url} cannot be converted: {exc}", foreign.url) from exc
    groups = pack_pieces(conversion.pieces)
    suffix = new_suffix()
    keys = [data_key(dst_name, k, len(groups), suffix) for k in range(len(groups))]
    total = sum(p.nbytes for p in conversion.pieces)
    written: list[str] = []
    objects: list[DataObject] = []
    pieces: dict[PieceId, StoredPiece] = {}
    try:
        with reporting(progress, total, f"convert {foreign.url}") as sink:
            for key, group in zip(keys, groups, strict=True):
                written.append(key)
                obj, stored = _write_object(dst, key, group)
                objects.append(obj)
                pieces.update(stored)
                sink.update(obj.size)
        numbered, chunks = number_objects(objects, {}, pieces)
        index = assemble_index(dst_name, _entries(conversion), numbered, chunks, None)
        if conversion.dcp is not None:
            index = dataclasses.replace(index, dcp=dict(conversion.dcp))
        stale = verify_and_commit(dst, index, seen, reread=reread, progress=progress)
    except BaseException:
        discard_written(dst, written)
        raise
    delete_replaced(dst, dst_name, stale)
    return len(objects), sum(o.size for o in objects)


def claim_destination(dst: Storage, dst_name: str, *, force: bool) -> ObjectMeta | None:
    """The destination index a copy will replace (``None``: none), refused unless ``force``."""
    seen = head_index(dst, dst_name)
    if seen is not None and not force:
        raise AlreadyExistsError(f"{dst.url_for(dst_name)} already exists (use --force to replace it)",
                                 dst.url_for(index_key(dst_name)))
    return seen


def verify_and_commit(dst: Storage, index: CheckpointIndex, seen: ObjectMeta | None, *, reread: bool,
                      progress: ProgressFactory) -> list[str]:
    """Commit a copy's index - after re-reading every written byte against it when ``reread`` -
    and return the data objects the replaced index named (for ``delete_replaced``).

    Raises:
        ChecksumError: the copy reads back wrong (nothing committed).
    """
    if reread:
        with reporting(progress, sum(o.size for o in index.objects), f"verify {index.name}") as sink:
            problems = verify_data(dst, index, sink)
        if problems:
            raise ChecksumError(f"the copy at {dst.url_for(index.name)} reads back wrong, nothing was committed: "
                                + "; ".join(p.line() for p in problems[:5]))
    _, _, stale = commit(dst, index, seen)
    return stale


def discard_written(dst: Storage, written: Sequence[str]) -> None:
    """Remove what a copy wrote, except objects a committed index names (a recopy, or a
    checkpoint copied earlier that this one references); what cannot be removed, gc will."""
    try:
        delete_unreferenced(dst, written)
    except (StorageError, CheckpointFormatError) as exc:
        log.warning("could not remove %d copied data object(s) from %s: %s (cloudckpt gc will)",
                    len(written), dst.url, exc)
