"""``verify``: re-read a checkpoint's bytes and check every CRC32C the index records.

A restore stops at the first bad chunk; verify keeps going and lists everything that is
wrong, by key: missing data objects, objects whose size differs from the index (truncated
or grown), chunks whose CRC32C does not match, an index that does not parse. The index
itself is validated whole by ``format.decode_index`` (tree, offsets, shapes, names).

Memory stays bounded: each data object is streamed in windows of at most
``WINDOW`` bytes (one ranged GET each), and the windows' bytes are fed to the running
CRC32C of each chunk they cover; data objects are verified in parallel on a pool as wide
as the storage's ``max_concurrency``. ``copy`` uses :func:`verify_data` to check what it
wrote before committing; ``cloudckpt verify`` prints :func:`verify`'s report.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cloudckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointStateError,
    ChecksumError,
    CloudCkptError,
    InvalidRangeError,
    NotFoundError,
)
from cloudckpt.format import ArrayEntry, CheckpointIndex, Chunk
from cloudckpt.format.sniff import ForeignCheckpoint
from cloudckpt.format.state_file import read_state
from cloudckpt.manager.directory import latest_name
from cloudckpt.storage import ByteRange, ObjectMeta, Storage
from cloudckpt.storage.checksum import combine_blocks, crc32c_of
from cloudckpt.tfbundle import Bundle
from cloudckpt.tfbundle.entries import DT_STRING, DTYPES, Entry
from cloudckpt.tfbundle.strings import decode_strings
from cloudckpt.tools.directory import checkpoint_at, no_checkpoints, open_directory, scan_directory, sort_names
from cloudckpt.tools.foreign import foreign_tensors, is_directory_checkpoint, object_sizes, open_checkpoint
from cloudckpt.tools.progress import ProgressFactory, ProgressSink, reporting, silent

#: Bytes per ranged GET while streaming a data object.
WINDOW = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong with a checkpoint.

    Attributes:
        kind: ``bad-index`` | ``missing-object`` | ``size-mismatch`` | ``crc-mismatch`` | ``unreadable``.
        detail: what is wrong, in words (names the object and byte range where it can).
        key: the key path (or TensorFlow object path) at fault, when one is.
        object: the data object at fault, when one is.
    """

    kind: str
    detail: str
    key: str | None = None
    object: str | None = None

    def line(self) -> str:
        return f"{self.key}: {self.detail}" if self.key else self.detail

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "object": self.object, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class CheckpointVerdict:
    """The verdict on one checkpoint: what was checked, and every finding (none: intact)."""

    name: str
    url: str
    arrays: int = 0
    objects: int = 0
    bytes: int = 0
    findings: tuple[Finding, ...] = ()

    @property
    def intact(self) -> bool:
        return not self.findings

    @property
    def problems(self) -> list[Finding]:
        """The findings as a list (what ``cloudckpt.cli.verify``'s callers have always compared)."""
        return list(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "intact": self.intact, "arrays": self.arrays,
                "objects": self.objects, "bytes": self.bytes, "problems": [f.to_json() for f in self.findings]}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :func:`verify` found: one verdict per checkpoint checked, and problems of the directory itself.

    Attributes:
        checkpoints: the verdicts, in checkpoint order.
        directory_problems: e.g. a malformed state file (``state file: ...``).
    """

    checkpoints: tuple[CheckpointVerdict, ...]
    directory_problems: tuple[str, ...] = ()

    @property
    def damaged(self) -> tuple[CheckpointVerdict, ...]:
        return tuple(c for c in self.checkpoints if not c.intact)

    @property
    def intact(self) -> bool:
        return not self.damaged and not self.directory_problems

    def to_json(self) -> dict[str, Any]:
        return {"intact": self.intact, "checkpoints": [c.to_json() for c in self.checkpoints],
                "directory_problems": list(self.directory_problems)}


class _ObjectStream:
    """One data object read front to back in windows, handed out as slices of byte ranges.

    Chunks are asked for in offset order, so each window is fetched once; a window starts
    at the first byte a chunk needs, so gaps between chunks are not read.
    """

    def __init__(self, storage: Storage, key: str, end: int, progress: ProgressSink) -> None:
        self._storage = storage
        self._key = key
        self._end = end
        self._progress = progress
        self._buffer = b""
        self._start = 0

    def segments(self, start: int, stop: int) -> Iterator[memoryview]:
        while start < stop:
            if not self._start <= start < self._start + len(self._buffer):
                window_end = min(start + WINDOW, self._end)
                self._buffer = self._storage.get(self._key, ByteRange.bounded(start, window_end))
                self._start = start
                self._progress.update(len(self._buffer))
            piece_end = min(stop, self._start + len(self._buffer))
            yield memoryview(self._buffer)[start - self._start:piece_end - self._start]
            start = piece_end


def _verify_object(storage: Storage, index: CheckpointIndex, position: int,
                   chunks: Sequence[tuple[str, Chunk]], progress: ProgressSink) -> list[Finding]:
    """Check one data object: present, the recorded size, and each chunk's CRC32C."""
    obj = index.objects[position]
    try:
        meta: ObjectMeta = storage.head(obj.name)
    except NotFoundError:
        keys = sorted({path for path, _ in chunks})
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        return [Finding("missing-object", f"data object {obj.name} is missing"
                        f"{f' (holds {shown})' if keys else ''}", object=obj.name)]
    problems: list[Finding] = []
    if meta.size != obj.size:
        what = "truncated" if meta.size < obj.size else "longer than recorded"
        problems.append(Finding("size-mismatch", f"data object {obj.name} is {what}: {meta.size} bytes, "
                                f"the index records {obj.size}", object=obj.name))
    readable = min(meta.size, obj.size)
    stream = _ObjectStream(storage, obj.name, readable, progress)
    for path, chunk in sorted(chunks, key=lambda item: item[1].offset):
        where = f"in {obj.name} bytes [{chunk.offset}, {chunk.offset + chunk.length})"
        if chunk.offset + chunk.length > readable:
            problems.append(Finding("unreadable", f"bytes lost {where}: the object ends at byte {meta.size}",
                                    key=path, object=obj.name))
            continue
        unit, recorded = chunk.blocks()
        try:
            blocks = [crc32c_of(stream.segments(chunk.offset + start, chunk.offset + min(start + unit, chunk.length)))
                      for start in range(0, chunk.length, unit)] or [crc32c_of([])]
        except (NotFoundError, InvalidRangeError) as exc:
            problems.append(Finding("unreadable", f"could not read {where}: {exc}", key=path, object=obj.name))
            continue
        actual = combine_blocks(blocks, unit, chunk.length)
        bad = [k for k, (crc, want) in enumerate(zip(blocks, recorded, strict=True)) if crc != want]
        if bad and actual == chunk.crc32c:  # the bytes are right, the index's block checksums are not
            problems.append(Finding("crc-mismatch", f"block CRC32C(s) {bad[:5]} of {unit} bytes {where} do not "
                                    "match the bytes (a damaged index)", key=path, object=obj.name))
        if actual != chunk.crc32c:
            problems.append(Finding("crc-mismatch", f"CRC32C mismatch {where}: recorded {chunk.crc32c:08x}, "
                                    f"read {actual:08x}", key=path, object=obj.name))
    return problems


def verify_data(storage: Storage, index: CheckpointIndex, progress: ProgressSink) -> list[Finding]:
    """Every data object of ``index`` present, of its recorded size, every chunk's CRC32C right."""
    by_object: dict[int, list[tuple[str, Chunk]]] = {i: [] for i in range(len(index.objects))}
    for path, entry in index.entries.items():
        if isinstance(entry, ArrayEntry):
            for chunk in entry.chunks:
                by_object[chunk.object].append((path, chunk))
    workers = max(1, min(storage.config.max_concurrency, len(by_object)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloudckpt-verify") as pool:
        results = list(pool.map(lambda i: _verify_object(storage, index, i, by_object[i], progress), by_object))
    return [problem for problems in results for problem in problems]


# ---------------------------------------------------------------------------- TensorFlow checkpoints
def verify_bundle(bundle: Bundle, progress: ProgressSink) -> list[Finding]:
    """Every shard present, every stored tensor inside its shard and matching its CRC32C.

    The index itself was validated whole when ``bundle`` was opened (``Bundle``), with the
    checks ``load_variable`` relies on: a partitioned tensor's slices tile it exactly once
    and hold distinct bytes, or the checkpoint is reported as a bad index. Each shard is
    streamed front to back in bounded windows (as for cloudckpt's own checkpoints); shards
    are checked in parallel.
    """
    problems: list[Finding] = []
    try:
        display = {key: name for name, key in bundle.names.items()}
    except (ChecksumError, CheckpointFormatError, CheckpointNotFoundError) as exc:
        display = {}
        problems.append(Finding("crc-mismatch" if isinstance(exc, ChecksumError) else "bad-index",
                                f"the object graph (tensor names) is unreadable: {exc}"))
    by_shard: dict[int, list[tuple[str, Entry]]] = {i: [] for i in range(bundle.header.num_shards)}
    for name, entry in bundle.stored_entries(display):
        by_shard[entry.shard].append((name, entry))
    workers = max(1, min(bundle.storage.config.max_concurrency, len(by_shard)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cloudckpt-verify") as pool:
        results = list(pool.map(lambda i: _verify_shard(bundle, i, by_shard[i], progress), by_shard))
    return problems + [p for found in results for p in found]


def _verify_shard(bundle: Bundle, shard: int, entries: list[tuple[str, Entry]],
                  progress: ProgressSink) -> list[Finding]:
    key = bundle.objects[shard]
    try:
        size = bundle.shard_size(shard)
    except CheckpointNotFoundError:
        held = sorted({name for name, _ in entries})
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        return [Finding("missing-object", f"data shard {key} is missing" + (f" (holds {shown})" if held else ""),
                        object=key)]
    problems: list[Finding] = []
    stream = _ObjectStream(bundle.storage, key, size, progress)
    for name, entry in sorted(entries, key=lambda item: item[1].offset):
        where = f"in {key} bytes [{entry.offset}, {entry.offset + entry.size})"
        if entry.offset + entry.size > size:
            problems.append(Finding("unreadable", f"bytes lost {where}: the shard ends at byte {size}",
                                    key=name, object=key))
            continue
        if entry.size == 0:
            continue
        try:
            pieces = stream.segments(entry.offset, entry.offset + entry.size)
            if entry.dtype == DT_STRING:
                _, actual = decode_strings(b"".join(pieces), entry.count, big_endian=bundle.header.big_endian,
                                           url=bundle.storage.url_for(key), key=name)
            elif entry.dtype in DTYPES:
                actual = crc32c_of(pieces)
            else:
                continue  # resource/variant: per-element framing not decoded (docs/tensorflow-import.md)
        except ChecksumError as exc:
            problems.append(Finding("crc-mismatch", str(exc), key=name, object=key))
            continue
        except InvalidRangeError as exc:
            problems.append(Finding("unreadable", f"could not read {where}: {exc}", key=name, object=key))
            continue
        if actual != entry.crc32c:
            problems.append(Finding("crc-mismatch", f"CRC32C mismatch {where}: recorded {entry.crc32c:08x}, "
                                    f"read {actual:08x}", key=name, object=key))
    return problems


# ---------------------------------------------------------------------------- other foreign formats
def verify_foreign(storage: Storage, foreign: ForeignCheckpoint, progress: ProgressSink) -> list[Finding]:
    """Every object the checkpoint's metadata names is present, and every tensor reads back whole.

    Formats such as torch DCP's and Orbax's record no checksum cloudckpt can check, so this is
    what "intact" can mean for them: present, in bounds and decodable. Tensors are read one at
    a time through the checkpoint's reader, so memory stays at the largest tensor.
    """
    problems = [Finding("missing-object", f"{storage.url_for(key)} is missing", object=key)
                for key, size in object_sizes(storage, foreign).items() if size is None]
    for tensor in foreign_tensors(foreign):
        try:
            foreign.reader.get_tensor(tensor.name)
        except (CloudCkptError, OSError, ValueError, KeyError, RuntimeError) as exc:
            problems.append(Finding("unreadable", f"does not read back: {exc}", key=tensor.name))
        progress.update(tensor.nbytes)
    return problems


def stored_size(bundle: Bundle) -> int:
    """Index plus data shards, by HEAD (TensorFlow's index does not record shard sizes)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, bundle.header.num_shards))) as pool:
        return bundle.index_size + sum(pool.map(bundle.shard_size, range(bundle.header.num_shards)))


def verify_checkpoint(storage: Storage, name: str, *, progress: ProgressFactory = silent) -> CheckpointVerdict:
    """Re-read checkpoint ``name`` (cloudckpt's, TensorFlow's, or a registered foreign format) and check
    every byte the index vouches for (a foreign format without checksums: that every tensor reads back)."""
    url = storage.url_for(name)
    try:
        index = open_checkpoint(storage, name)
    except CheckpointFormatError as exc:
        return CheckpointVerdict(name, url, findings=(Finding("bad-index", str(exc)),))
    if isinstance(index, ForeignCheckpoint):
        sizes = object_sizes(storage, index)
        total = sum(size or 0 for size in sizes.values())
        with reporting(progress, sum(t.nbytes for t in foreign_tensors(index)), f"verify {name}") as sink:
            found = verify_foreign(storage, index, sink)
        return CheckpointVerdict(name, index.url, len(foreign_tensors(index)), len(sizes), total, tuple(found))
    if isinstance(index, Bundle):
        try:
            size = stored_size(index) - index.index_size
        except CheckpointNotFoundError:
            size = 0  # a missing shard: verify_bundle reports it
        with reporting(progress, size, f"verify {name}") as sink:
            found = verify_bundle(index, sink)
        return CheckpointVerdict(name, url, len(index.keys), index.header.num_shards, size, tuple(found))
    size = sum(o.size for o in index.objects)
    with reporting(progress, size, f"verify {name}") as sink:
        found = verify_data(storage, index, sink)
    return CheckpointVerdict(name, url, sum(1 for e in index.entries.values() if isinstance(e, ArrayEntry)),
                             len(index.objects), size, tuple(found))


def _targets(url: str, latest_only: bool) -> tuple[Storage, list[str], list[str]]:
    """The storage, the checkpoint names to verify, and directory-level problems."""
    single = checkpoint_at(url)
    if single is not None:
        return single[0], [single[1]], []
    storage = open_directory(url)
    scan = scan_directory(storage)
    notes: list[str] = []
    if scan.has_state:
        try:
            read_state(storage)
        except CheckpointStateError as exc:
            notes.append(f"state file: {exc}")
    if latest_only:
        latest = latest_name(storage) if scan.indexes else None
        if latest is None:
            raise no_checkpoints(storage.url, scan)
        return storage, [latest], notes
    foreign = sort_names({sub for sub in scan.subdirectories if is_directory_checkpoint(storage, sub)})
    if not scan.indexes and not foreign:
        raise no_checkpoints(storage.url, scan)
    return storage, [n for n in scan.names if n in scan.indexes] + foreign, notes


def verify(url: str, *, latest: bool = False, progress: ProgressFactory = silent) -> VerifyReport:
    """Verify the checkpoint at ``url``, or every committed checkpoint of the directory ``url`` (``cloudckpt verify``).

    A restore stops at the first bad chunk; this keeps going and reports every finding by
    key and object. With ``latest``, a directory's latest checkpoint only (the one a resume
    would pick). A malformed state file is a directory problem.

    Raises:
        CheckpointNotFoundError: the directory holds no committed checkpoint.
    """
    storage, names, notes = _targets(url.rstrip("/") or url, latest)
    return VerifyReport(tuple(verify_checkpoint(storage, name, progress=progress) for name in names), tuple(notes))
