"""``copy_checkpoint``: one committed checkpoint copied between any two stores, its index written last.

The order is what makes an interrupted copy harmless, the same as a save's::

    check     -> the destination index must be absent, unless ``force``
    data      -> every data object, streamed: ranged GETs from SRC feed a multipart upload
                 to DST, at most ``max_concurrency`` parts in flight; the bytes' CRC32C is
                 computed per array chunk as they pass and compared with the index
    re-read   -> DST's data objects are read back and every chunk's CRC32C checked
                 (``verify.verify_data``); skipped without ``reread``
    commit    -> the index, last, with create-if-absent (replace-if-unchanged with ``force``):
                 only now does the copy exist as a checkpoint

Data objects keep their names (they are unique to the write that made them), so a copy
never overwrites bytes another index names. One exception, for a single checkpoint: an
object it reads at most half of - an evicted checkpoint's object, kept for a few bytes an
incremental save reused - is copied as only the ranges it reads (ranged GETs), into a new
object of the copy with the chunks' offsets moved (``ranges``). A directory
copy keeps every name, so the checkpoints that share an object share its one copy.

A failure before the commit removes the data objects this copy wrote; a SIGKILL leaves
them for ``cloudckpt gc``.

A TensorFlow checkpoint (told by its index bytes) is copied as-is - same index bytes, same
shard layout, renamed with the checkpoint - with the same order and checks (``_copy_bundle``).
Any other foreign format a registered reader opens (torch DCP's layout, ...) is converted into
cloudckpt's format through that reader (``copy_foreign``): atomic, CRC32C'd, memory bounded.

Memory: objects up to the destination's ``multipart_threshold`` (64 MiB by default) are
copied whole - one GET, one PUT, up to ``max_concurrency`` of them at once; larger ones
are streamed in parts, at most ``max_concurrency`` parts held at a time.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from cloudckpt.errors import AlreadyExistsError, CheckpointFormatError, ChecksumError, NotFoundError, StorageError
from cloudckpt.format import CheckpointIndex, Chunk, DataObject, index_key, object_checkpoint, renamed_object
from cloudckpt.format.sniff import ForeignCheckpoint
from cloudckpt.saving.commit import delete_replaced
from cloudckpt.saving.objects import new_suffix
from cloudckpt.storage import Storage
from cloudckpt.storage.transfer import gather
from cloudckpt.tfbundle import Bundle, data_object
from cloudckpt.tfbundle.entries import DTYPES
from cloudckpt.tools.copy_foreign import claim_destination, convert_foreign, discard_written, verify_and_commit
from cloudckpt.tools.foreign import open_checkpoint
from cloudckpt.tools.progress import ProgressFactory, reporting, silent
from cloudckpt.tools.ranges import packed_index, packed_name, plan_packings
from cloudckpt.tools.streaming import ChunkSums, Copier, chunks_by_object
from cloudckpt.tools.verify import Finding, verify_bundle

log = logging.getLogger("cloudckpt.tools")


@dataclass(frozen=True, slots=True)
class Copied:
    """What one checkpoint copy did.

    Attributes:
        objects, bytes: the data objects written, and their bytes.
        verified: whether the copy was re-read and checked before its commit.
        packed: objects written as only the ranges the checkpoint reads of a larger source object.
        present: objects of other checkpoints already at the destination (a directory copy's
            shared ones), not written again.
        carried: the source objects of other checkpoints the copy names under their own names.
    """

    src: str
    dst: str
    objects: int
    bytes: int
    verified: bool
    packed: int = 0
    present: int = 0
    carried: tuple[str, ...] = ()


def _renamed(index: CheckpointIndex, name: str) -> CheckpointIndex:
    """The index under another checkpoint name: data objects carry the name as their prefix.

    Objects of the checkpoints an incremental index references are renamed too, so a copy
    under a new name stands alone (it references nothing; their suffixes keep names unique).
    """
    if name == index.name:
        return index
    objects = tuple(DataObject(renamed_object(o.name, name), o.size) for o in index.objects)
    return replace(index, name=name, objects=objects, references=())


def _already_copied(dst: Storage, new: DataObject, src_name: str, old: DataObject) -> bool:
    """Whether an object another checkpoint owns (one an incremental index references) is already
    at the destination under the same name and size - copied with the checkpoint that wrote it.

    Names are write-unique, so the same name and size is the same bytes; the re-read
    verification (``reread``, the default) still checks them. Own objects are always copied.
    """
    if object_checkpoint(old.name) == src_name or new.name != old.name:
        return False
    try:
        return dst.head(new.name).size == new.size
    except NotFoundError:
        return False


def copy_checkpoint(src: Storage, src_name: str, dst: Storage, dst_name: str, *, force: bool, reread: bool,
                    progress: ProgressFactory = silent, ranged: bool = True) -> Copied:
    """Copy one committed checkpoint; the destination index is written last.

    ``ranged``: an object the checkpoint reads at most ``PACK_MAX_FRACTION`` of is copied as only
    the ranges it reads, into a new object of the copy (see the module docs). A directory copy
    passes ``False``: its checkpoints share their shared objects' copies.
    """
    index = open_checkpoint(src, src_name)
    if isinstance(index, Bundle):
        return _copy_bundle(index, dst, dst_name, force=force, reread=reread, progress=progress)
    if isinstance(index, ForeignCheckpoint):
        count, size = convert_foreign(index, dst, dst_name, force=force, reread=reread, progress=progress)
        return Copied(index.url, dst.url_for(dst_name), count, size, reread)
    seen = claim_destination(dst, dst_name, force=force)
    renamed = _renamed(index, dst_name)
    present = {i for i, (old, new) in enumerate(zip(index.objects, renamed.objects, strict=True))
               if _already_copied(dst, new, src_name, old)}
    packings = plan_packings(index, {i: packed_name(o.name, dst_name, new_suffix())
                                     for i, o in enumerate(index.objects) if i not in present}) if ranged else {}
    new_index = packed_index(renamed, packings)
    chunks = chunks_by_object(new_index)
    # (source object, what it becomes, running chunk CRCs, the packing when only ranges of it are copied)
    pairs = [(old, new, ChunkSums(chunks[i], packings.get(i)), packings.get(i))
             for i, (old, new) in enumerate(zip(index.objects, new_index.objects, strict=True)) if i not in present]
    total = sum(new.size for _, new, _, _ in pairs)
    written = [new.name for _, new, _, _ in pairs]
    problems: list[Finding] = []
    try:
        with reporting(progress, total, f"copy {src_name}") as sink:
            copier = Copier(src, dst, sink)
            # Objects copied whole go in parallel (at most max_concurrency held at once);
            # large ones one at a time, each with its parts in parallel on the destination's pool.
            with ThreadPoolExecutor(max_workers=copier.workers, thread_name_prefix="cloudckpt-cp-small") as pool:
                whole = [pool.submit(copier.copy_object, old.name, new.name, new.size, checks, packing)
                         for old, new, checks, packing in pairs if copier.copies_whole(new.size)]
                for old, new, checks, packing in pairs:
                    if not copier.copies_whole(new.size):
                        copier.copy_object(old.name, new.name, new.size, checks, packing)
                gather(whole)
            for old, _, checks, _ in pairs:
                problems += checks.problems(src.url_for(old.name))
        if problems:
            raise ChecksumError(f"the source {src.url_for(src_name)} is damaged, nothing was committed: "
                           + "; ".join(p.line() for p in problems[:5])
                           + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        stale = verify_and_commit(dst, new_index, seen, reread=reread, progress=progress)
    except BaseException:
        discard_written(dst, written)
        raise
    delete_replaced(dst, dst_name, stale)
    carried = tuple(old.name for i, old in enumerate(index.objects)
                    if i not in packings and object_checkpoint(old.name) != src_name)
    return Copied(src.url_for(src_name), dst.url_for(dst_name), len(pairs), total, reread, len(packings),
                  len(present), carried)


def _copy_bundle(bundle: Bundle, dst: Storage, dst_name: str, *, force: bool, reread: bool,
                 progress: ProgressFactory) -> Copied:
    """Copy a TensorFlow checkpoint as-is: its shards (named after ``dst_name``), then its index bytes.

    The order is a save's: shards first, their numeric tensors' CRC32Cs checked as the bytes
    pass (a string tensor's CRC is not one of its raw bytes: the re-read checks those), then
    the copy re-read and verified whole, then the index last with create-if-absent. TensorFlow's
    data names are not unique per write, so ``force`` first deletes the destination's old
    index: while its shards are rewritten, no index points at them.
    """
    src = bundle.storage
    count = bundle.header.num_shards
    targets = [data_object(dst_name, i, count) for i in range(count)]
    index = index_key(dst_name)
    existing = [key for key in (index, *targets) if dst.exists(key)]
    if existing and not force:
        raise AlreadyExistsError(f"{dst.url_for(existing[0])} already exists (use --force to replace it)",
                                 dst.url_for(existing[0]))
    if force and index in existing:
        dst.delete([index])
    sizes = [bundle.shard_size(i) for i in range(count)]
    display = {key: name for name, key in bundle.names.items()}
    chunks: dict[int, list[tuple[str, Chunk]]] = {i: [] for i in range(count)}
    for name, entry in bundle.stored_entries(display):
        if entry.offset + entry.size > sizes[entry.shard]:
            raise CheckpointFormatError(
                f"the source {bundle.url} is damaged, nothing was copied: {name} needs bytes "
                f"[{entry.offset}, {entry.offset + entry.size}) of {bundle.objects[entry.shard]}, "
                f"which has {sizes[entry.shard]}", bundle.url)
        if entry.dtype in DTYPES and entry.size:
            chunks[entry.shard].append((name, Chunk(entry.shard, entry.offset, entry.size, entry.crc32c, (), ())))
    total = sum(sizes)
    try:
        with reporting(progress, total, f"copy {bundle.name}") as sink:
            copier = Copier(src, dst, sink)
            sums = [ChunkSums(chunks[i]) for i in range(count)]
            with ThreadPoolExecutor(max_workers=copier.workers, thread_name_prefix="cloudckpt-cp-small") as pool:
                whole = [pool.submit(copier.copy_object, bundle.objects[i], targets[i], sizes[i], sums[i])
                         for i in range(count) if copier.copies_whole(sizes[i])]
                for i in range(count):
                    if not copier.copies_whole(sizes[i]):
                        copier.copy_object(bundle.objects[i], targets[i], sizes[i], sums[i])
                gather(whole)
        problems = [p for i in range(count) for p in sums[i].problems(src.url_for(bundle.objects[i]))]
        if problems:
            raise ChecksumError(f"the source {bundle.url} is damaged, nothing was committed: "
                           + "; ".join(p.line() for p in problems[:5]))
        if reread:
            with reporting(progress, total, f"verify {dst_name}") as sink:
                problems = verify_bundle(Bundle(dst, dst_name, bundle.index_bytes), sink)
            if problems:
                raise ChecksumError(f"the copy at {dst.url_for(dst_name)} reads back wrong, nothing was committed: "
                               + "; ".join(p.line() for p in problems[:5]))
        dst.put(index, bundle.index_bytes, mode="create")
    except BaseException:
        try:
            dst.delete(targets)
        except StorageError as exc:
            log.warning("could not remove %d copied data shard(s) from %s: %s", count, dst.url, exc)
        raise
    return Copied(bundle.url, dst.url_for(dst_name), count, total, reread)
