"""``copy``: a checkpoint, or a managed directory, copied between any two stores (``cloudckpt cp``).

The order is what makes an interrupted copy harmless, the same as a save's::

    check     -> the destination index (and state file) must be absent, unless --force
    data      -> every data object, streamed: ranged GETs from SRC feed a multipart upload
                 to DST, at most ``max_concurrency`` parts in flight; the bytes' CRC32C is
                 computed per array chunk as they pass and compared with the index
    re-read   -> DST's data objects are read back and every chunk's CRC32C checked
                 (``tools.verify.verify_data``); skipped with --no-reread
    commit    -> the index, last, with create-if-absent (replace-if-unchanged with --force):
                 only now does the copy exist as a checkpoint
    state     -> for a directory: the state file, after every checkpoint, naming only those copied

A directory copy skips a damaged checkpoint (malformed index, bytes failing their CRC32C,
truncated or missing data objects), reports it, copies every intact one, and exits 1, so
the destination's latest is the newest intact checkpoint of the source.

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

Memory: objects up to the destination's ``multipart_threshold`` (64 MiB by default) are
copied whole - one GET, one PUT, up to ``max_concurrency`` of them at once; larger ones
are streamed in parts, at most ``max_concurrency`` parts held at a time.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from cloudckpt.checksum import Crc32c
from cloudckpt.errors import (
    AlreadyExistsError,
    CheckpointFormatError,
    CheckpointStateError,
    ChecksumError,
    InvalidRangeError,
    NotFoundError,
    PreconditionError,
    StorageError,
)
from cloudckpt.format import (
    ArrayEntry,
    CheckpointIndex,
    Chunk,
    DataObject,
    index_key,
    object_checkpoint,
    renamed_object,
)
from cloudckpt.index_store import head_index
from cloudckpt.references import delete_unreferenced
from cloudckpt.saving.commit import commit, delete_replaced
from cloudckpt.saving.objects import new_suffix
from cloudckpt.state_file import STATE_KEY, CheckpointState, read_state, write_state
from cloudckpt.storage import ByteRange, ObjectMeta, Storage, TransferConfig, open_storage, split_url, url_scheme
from cloudckpt.storage.transfer import gather
from cloudckpt.tfbundle import Bundle, data_object, load_any_index
from cloudckpt.tfbundle.entries import DTYPES
from cloudckpt.tools.directory import (
    DirectoryScan,
    checkpoint_at,
    no_checkpoints,
    open_directory,
    scan_directory,
    sort_names,
)
from cloudckpt.tools.progress import ProgressFactory, ProgressSink, reporting, silent
from cloudckpt.tools.ranges import Packing, packed_index, packed_name, plan_packings
from cloudckpt.tools.verify import Finding, verify_bundle, verify_data

#: S3 refuses parts below 5 MiB (except the last); no store needs smaller ones.
MIN_PART_SIZE = 5 * 1024 * 1024

log = logging.getLogger("cloudckpt.cli")


class _ChunkSums:
    """Running CRC32C of each array chunk of one data object, fed bytes in offset order.

    Why running sums: the bytes arrive part by part from a stream that is never held whole.
    """

    def __init__(self, chunks: Sequence[tuple[str, Chunk]], packing: Packing | None = None) -> None:
        self._packing = packing  # the chunks' offsets are in the packed object; problems name the source's
        self._chunks = sorted(chunks, key=lambda item: item[1].offset)
        self._starts = [chunk.offset for _, chunk in self._chunks]
        self._sums = [Crc32c() for _ in self._chunks]

    def feed(self, start: int, data: memoryview) -> None:
        end = start + data.nbytes
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        for i in range(first, len(self._chunks)):
            chunk = self._chunks[i][1]
            if chunk.offset >= end:
                break
            lo, hi = max(chunk.offset, start), min(chunk.offset + chunk.length, end)
            if lo < hi:
                self._sums[i].update(data[lo - start:hi - start])

    def problems(self, obj: str) -> list[Finding]:
        out = []
        for (path, chunk), checksum in zip(self._chunks, self._sums, strict=True):
            actual = checksum.value
            if actual != chunk.crc32c:
                start = chunk.offset if self._packing is None or not chunk.length else \
                    self._packing.source_ranges(chunk.offset, chunk.offset + 1)[0][0]
                out.append(Finding("crc-mismatch", f"source bytes [{start}, {start + chunk.length}) "
                                   f"of {obj} fail their CRC32C: recorded {chunk.crc32c:08x}, read {actual:08x}",
                                   key=path, object=obj))
        return out


def _chunks_by_object(index: CheckpointIndex) -> dict[int, list[tuple[str, Chunk]]]:
    out: dict[int, list[tuple[str, Chunk]]] = {i: [] for i in range(len(index.objects))}
    for path, entry in index.entries.items():
        if isinstance(entry, ArrayEntry):
            for chunk in entry.chunks:
                out[chunk.object].append((path, chunk))
    return out


class _Copier:
    """Streams data objects from one store to another through ``Storage.put_stream``."""

    def __init__(self, src: Storage, dst: Storage, progress: ProgressSink) -> None:
        self.src = src
        self.dst = dst
        self.progress = progress
        self.workers = max(1, dst.config.max_concurrency)

    def copies_whole(self, size: int) -> bool:
        """Whether an object of ``size`` bytes goes in one GET and one PUT (held whole in memory)."""
        return size <= self.dst.config.multipart_threshold or not self.dst.supports_multipart

    def copy_object(self, src_key: str, dst_key: str, size: int, sums: _ChunkSums,
                    packing: Packing | None = None) -> None:
        """One data object: ranged GETs feed the destination's writer; chunk CRCs computed in passing.

        With ``packing``, the ``size`` bytes written are only its spans of ``src_key``, end to end.
        """
        url = self.src.url_for(src_key)

        def read(start: int, end: int) -> list[bytes]:
            if end == start:
                return []
            ranges = [(start, end)] if packing is None else packing.source_ranges(start, end)
            try:
                if len(ranges) == 1:
                    return [self.src.get(src_key, ByteRange.bounded(*ranges[0]))]
                return self.src.get_ranges(src_key, ranges)
            except InvalidRangeError as exc:
                raise CheckpointFormatError(f"{url} is shorter than the {size} bytes its index records "
                                            "(truncated?)") from exc

        def consume(start: int, part: memoryview) -> None:
            sums.feed(start, part)
            self.progress.update(part.nbytes)

        self.dst.put_stream(dst_key, size, read, consume=consume)


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


def _discard(dst: Storage, written: Sequence[str]) -> None:
    """Remove what this copy wrote, except objects a committed index names (a recopy, or a
    checkpoint copied earlier that this one references)."""
    try:
        delete_unreferenced(dst, written)
    except (StorageError, CheckpointFormatError) as exc:
        log.warning("could not remove %d copied data object(s) from %s: %s (cloudckpt gc will)",
                    len(written), dst.url, exc)


def _already_copied(dst: Storage, new: DataObject, src_name: str, old: DataObject) -> bool:
    """Whether an object another checkpoint owns (one an incremental index references) is already
    at the destination under the same name and size - copied with the checkpoint that wrote it.

    Names are write-unique, so the same name and size is the same bytes; the re-read
    verification (``--verify``, default) still checks them. Own objects are always copied.
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
    index = load_any_index(src, src_name)
    if isinstance(index, Bundle):
        return _copy_bundle(index, dst, dst_name, force=force, reread=reread, progress=progress)
    seen = head_index(dst, dst_name)
    if seen is not None and not force:
        raise AlreadyExistsError(f"{dst.url_for(dst_name)} already exists (use --force to replace it)",
                                 dst.url_for(index_key(dst_name)))
    renamed = _renamed(index, dst_name)
    present = {i for i, (old, new) in enumerate(zip(index.objects, renamed.objects, strict=True))
               if _already_copied(dst, new, src_name, old)}
    packings = plan_packings(index, {i: packed_name(o.name, dst_name, new_suffix())
                                     for i, o in enumerate(index.objects) if i not in present}) if ranged else {}
    new_index = packed_index(renamed, packings)
    chunks = _chunks_by_object(new_index)
    # (source object, what it becomes, running chunk CRCs, the packing when only ranges of it are copied)
    pairs = [(old, new, _ChunkSums(chunks[i], packings.get(i)), packings.get(i))
             for i, (old, new) in enumerate(zip(index.objects, new_index.objects, strict=True)) if i not in present]
    total = sum(new.size for _, new, _, _ in pairs)
    written = [new.name for _, new, _, _ in pairs]
    problems: list[Finding] = []
    try:
        with reporting(progress, total, f"copy {src_name}") as sink:
            copier = _Copier(src, dst, sink)
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
        if reread:
            with reporting(progress, sum(o.size for o in new_index.objects), f"verify {dst_name}") as sink:
                problems = verify_data(dst, new_index, sink)
            if problems:
                raise ChecksumError(f"the copy at {dst.url_for(dst_name)} reads back wrong, nothing was committed: "
                               + "; ".join(p.line() for p in problems[:5]))
        _, _, stale = commit(dst, new_index, seen)
    except BaseException:
        _discard(dst, written)
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
    data names are not unique per write, so ``--force`` first deletes the destination's old
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
            copier = _Copier(src, dst, sink)
            sums = [_ChunkSums(chunks[i]) for i in range(count)]
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


def destination_storage(url: str, part_size: int | None) -> Storage:
    """The destination, with the requested part size (a fresh storage: the cached one keeps its config)."""
    if part_size is None:
        return open_directory(url)
    size = max(part_size, MIN_PART_SIZE)
    return open_storage(url, config=TransferConfig(part_size=size, multipart_threshold=size))


def is_directory_target(dst: str) -> bool:
    """A trailing '/' (or an existing local directory) means "into this directory"."""
    if dst.endswith("/"):
        return True
    return url_scheme(dst) == "file" and "://" not in dst and Path(dst).is_dir()


def _relative(name: str, directory: str) -> str:
    prefix = directory.rstrip("/") + "/"
    return name[len(prefix):] if name.startswith(prefix) else name


def _copy_state(src: Storage, dst: Storage, copied: Sequence[str], force: bool) -> bool:
    """The state file, naming only what was copied, paths made relative and the writer token dropped
    (the copy is unclaimed). ``False`` when the source has none or none of its checkpoints was copied."""
    found = read_state(src)
    if found is None:
        return False
    state = found[0]
    kept = set(copied)
    names = [_relative(p, src.url) for p in state.all_model_checkpoint_paths]
    stamps: list[float | None] = [*state.all_model_checkpoint_timestamps] or [None] * len(names)
    pairs = [(n, t) for n, t in zip(names, stamps, strict=True) if n in kept]
    if not pairs:
        return False
    latest = _relative(state.model_checkpoint_path, src.url) if state.model_checkpoint_path else None
    if latest not in kept:
        latest = pairs[-1][0]  # the source's latest was damaged: the newest one that was copied
    new = CheckpointState(
        model_checkpoint_path=latest, all_model_checkpoint_paths=[n for n, _ in pairs],
        all_model_checkpoint_timestamps=[t for _, t in pairs if t is not None],
        last_preserved_timestamp=state.last_preserved_timestamp, writer=None,
        preserved={k: v for k, v in state.preserved.items() if _relative(k, src.url) in kept},
        metrics={k: v for k, v in state.metrics.items() if _relative(k, src.url) in kept})
    current: ObjectMeta | None
    try:
        current = dst.head(STATE_KEY)
    except NotFoundError:
        current = None
    if current is not None and not force:
        raise AlreadyExistsError(f"{dst.url_for(STATE_KEY)} already exists (use --force to replace it)",
                                 dst.url_for(STATE_KEY))
    try:
        write_state(dst, new, current)
    except PreconditionError as exc:
        raise PreconditionError(f"{dst.url_for(STATE_KEY)} changed while copying: {exc}",
                                dst.url_for(STATE_KEY)) from exc
    return True


def _damage(exc: Exception, src: Storage) -> str | None:
    """Why one checkpoint of a directory could not be copied when the cause is damage, else ``None``.

    Damage - a malformed index, bytes that fail their CRC32C, a truncated or missing data
    object of the source, a copy that reads back wrong - skips that checkpoint; anything else
    (credentials, the network, a full destination, an existing destination) stops the whole copy.
    """
    if isinstance(exc, (CheckpointFormatError, ChecksumError)):
        return _one_line(exc)
    if isinstance(exc, NotFoundError) and (exc.url or "").startswith(src.url.rstrip("/") + "/"):
        return f"an object it names is missing: {_one_line(exc)}"
    return None


def _one_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@dataclass(frozen=True, slots=True)
class Damaged:
    """A checkpoint of a directory that was not copied because it (or its copy) is damaged."""

    name: str
    url: str
    reason: str


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What :func:`copy` did.

    Attributes:
        copied: each checkpoint copied, in order (one for a single checkpoint).
        damaged: checkpoints of a directory skipped as damaged (they are not at the destination).
        state_copied: whether the state file was copied (naming only the checkpoints copied).
        state_problem: why the source's state file was not copied (it is malformed), if so.
        carried_with: names without an index whose data was copied with the checkpoints that
            read it (an evicted checkpoint an incremental one reuses), and those checkpoints.
        left: names without an index whose data stays behind (no copied checkpoint reads it).
        state_url: the source's and destination's state file URLs (a directory copy).
        directory: whether a directory was copied (rather than one checkpoint).
    """

    copied: tuple[Copied, ...]
    damaged: tuple[Damaged, ...] = ()
    state_copied: bool = False
    state_problem: str | None = None
    carried_with: tuple[tuple[str, tuple[str, ...]], ...] = ()
    left: tuple[str, ...] = ()
    state_url: tuple[str, str] = ("", "")
    directory: bool = False

    @property
    def complete(self) -> bool:
        """Nothing was skipped as damaged (the checkpoints, and the state file)."""
        return not self.damaged and self.state_problem is None


def _unindexed(scan: DirectoryScan, copies: dict[str, Copied]) -> tuple[tuple[tuple[str, tuple[str, ...]], ...],
                                                                          tuple[str, ...]]:
    """What became of the names that have data objects but no index.

    An evicted checkpoint whose objects the copied checkpoints still name was copied with
    them (a directory copy keeps shared objects); only objects no copied checkpoint names -
    crashed saves, which ``gc`` removes, or data only a damaged checkpoint reads - stay behind.
    """
    users: dict[str, set[str]] = {}
    for name, copied in copies.items():
        for obj in copied.carried:
            users.setdefault(obj, set()).add(name)
    carried: list[tuple[str, tuple[str, ...]]] = []
    left: list[str] = []
    for name in scan.names:
        if name in scan.indexes:
            continue
        keys = [m.key for m in scan.data.get(name, [])]
        kept_for = sort_names({user for key in keys for user in users.get(key, ())})
        if kept_for:
            carried.append((name, tuple(kept_for)))
        if any(key not in users for key in keys):
            left.append(name)
    return tuple(carried), tuple(left)


def copy(src_url: str, dst_url: str, *, force: bool = False, reread: bool = True, part_size: int | None = None,
         progress: ProgressFactory = silent, on_copied: Callable[[Copied], None] | None = None,
         on_damaged: Callable[[Damaged], None] | None = None) -> CopyReport:
    """Copy the checkpoint, or every committed checkpoint of the directory, at ``src_url`` to ``dst_url``.

    A checkpoint goes to ``dst_url`` as its new path, or into it when ``dst_url`` ends in
    ``/`` or is an existing local directory; a directory goes into the directory ``dst_url``,
    its state file last. ``on_copied``/``on_damaged`` hear of each checkpoint as it is done.

    Raises:
        AlreadyExistsError: a destination checkpoint or state file exists (without ``force``).
        ChecksumError / CheckpointFormatError: a single checkpoint is damaged (nothing committed).
        CheckpointNotFoundError: the directory holds no committed checkpoint.
    """
    src_url = src_url.rstrip("/") or src_url
    single = checkpoint_at(src_url)
    if single is not None:
        src, src_name = single
        if is_directory_target(dst_url):
            dst, dst_name = destination_storage(dst_url.rstrip("/") or dst_url, part_size), src_name
        else:
            directory, dst_name = split_url(dst_url)
            dst = destination_storage(directory, part_size)
        done = copy_checkpoint(src, src_name, dst, dst_name, force=force, reread=reread, progress=progress)
        if on_copied is not None:
            on_copied(done)
        return CopyReport((done,))
    src = open_directory(src_url)
    scan = scan_directory(src)
    if not scan.indexes:
        raise no_checkpoints(src.url, scan)
    dst = destination_storage(dst_url.rstrip("/") or dst_url, part_size)
    names = sort_names(set(scan.indexes))
    if not force:
        existing = [n for n in names if dst.exists(index_key(n))]
        if scan.has_state and dst.exists(STATE_KEY):
            existing.append(STATE_KEY)
        if existing:
            raise AlreadyExistsError(f"{dst.url} already has {', '.join(existing)} (use --force to replace)", dst.url)
    copies: dict[str, Copied] = {}
    damaged: list[Damaged] = []
    for name in names:
        try:
            copies[name] = copy_checkpoint(src, name, dst, name, force=force, reread=reread, progress=progress,
                                           ranged=False)
        except Exception as exc:
            reason = _damage(exc, src)
            if reason is None:
                raise
            damaged.append(Damaged(name, src.url_for(name), reason))
            if on_damaged is not None:
                on_damaged(damaged[-1])
        else:
            if on_copied is not None:
                on_copied(copies[name])
    carried, left = _unindexed(scan, copies)
    state_copied, state_problem = False, None
    try:
        state_copied = bool(copies) and _copy_state(src, dst, list(copies), force)
    except CheckpointStateError as exc:
        state_problem = _one_line(exc)
    return CopyReport(tuple(copies.values()), tuple(damaged), state_copied, state_problem, carried, left,
                      (src.url_for(STATE_KEY), dst.url_for(STATE_KEY)), directory=True)
