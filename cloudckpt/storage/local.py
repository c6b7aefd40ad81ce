"""Local-disk backend: the embedded default, as crash-safe as an object store.

Every object is written to a temporary file under ``<root>/.cloudckpt-tmp/``, fsynced,
then moved into place (``rename`` for overwrite, ``link`` for create-if-absent, which
fails atomically if the name exists), and the directory is fsynced: an object appears
whole or not at all, even across a power cut. Large objects are filled by parallel
positional writes (``pwrite`` releases the GIL, so threads overlap page-cache copies).
The temporary directory is removed again when a write leaves it empty, so a checkpoint
directory shows only checkpoints (as TensorFlow's do); what a killed writer left stays
there for ``cloudckpt gc`` (``manager/cleanup.py``). ``rmdir`` only removes an empty directory,
and a writer whose directory vanished between ``mkdir`` and ``open`` creates it again.

Versions and user metadata live in extended attributes set on the temporary file before
the move, so they change atomically with the content. Compare-and-swap takes an
``flock`` on the key's directory: the lock dies with its process, so a SIGKILLed writer
never wedges the directory (a lock *file* whose existence is the lock would).

Where the file system has no user xattrs, versions fall back to (inode, mtime, size),
which a fast re-write can repeat; and rename is not atomic on gcsfuse or some NFS
mounts - use ``gs://`` / ``s3://`` URLs rather than a mounted bucket.

Why one ~450-line module: one backend, and most of its length is the crash-safety of
each verb (temp file, fsync, rename or link, directory fsync) that must be read together.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

from cloudckpt.errors import (
    AlreadyExistsError,
    InvalidRangeError,
    InvalidURLError,
    PermissionDeniedError,
    PreconditionError,
    StorageError,
)
from cloudckpt.storage.base import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    ByteRange,
    MultipartUpload,
    ObjectMeta,
    Storage,
    TransferConfig,
    UpdateVersion,
    WriteMode,
    file_in_the_way,
    translate_os_error,
)
from cloudckpt.storage.keys import SPREAD_INFIX

_VERSION_XATTR = "user.cloudckpt.version"
#: Buffers per ``preadv`` call (Linux's ``IOV_MAX``; more fail with EINVAL).
_IOV_MAX = 1024
_META_XATTR = "user.cloudckpt.meta"


class LocalStorage(Storage):
    """A directory on local disk. URL: a plain path or ``file:///abs/path``."""

    schemes: ClassVar[tuple[str, ...]] = ("file",)

    def __init__(self, url: str | os.PathLike[str], *, config: TransferConfig | None = None) -> None:
        text = os.fspath(url)
        if text.startswith("file://"):
            text = text[len("file://"):]
            if not text.startswith("/"):
                raise InvalidURLError(f"file:// URL must hold an absolute path, got {url!r}", str(url))
        if not text:
            raise InvalidURLError("empty local path", str(url))
        self.root = Path(text).absolute()
        super().__init__(str(self.root), config)
        self._xattrs: bool | None = None
        self._xattr_lock = threading.Lock()

    @property
    def _prefix(self) -> str:
        return ""

    def _path(self, full_key: str) -> Path:
        return self.root / full_key

    # ------------------------------------------------------------------ reads
    def _head(self, full_key: str) -> ObjectMeta:
        path = self._path(full_key)
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if not _is_regular(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a file", str(path))
            return ObjectMeta(
                key=full_key,
                size=st.st_size,
                version=self._version_of(fd, st),
                last_modified=datetime.fromtimestamp(st.st_mtime, timezone.utc),
                metadata=self._metadata_of(fd),
            )
        finally:
            os.close(fd)

    def _get_range(self, full_key: str, byte_range: ByteRange | None) -> bytes:
        with open(self._path(full_key), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if byte_range is None:
                return f.read()
            if byte_range.suffix_length is not None:
                start, end = max(size - byte_range.suffix_length, 0), size
            else:
                start = byte_range.start or 0
                end = size if byte_range.end is None else min(byte_range.end, size)
                if start > size:
                    raise InvalidRangeError(
                        f"range {byte_range.http_header()} starts past the end of "
                        f"{self._url_of_full(full_key)} ({size} bytes)", self._url_of_full(full_key))
            return os.pread(f.fileno(), max(end - start, 0), start)

    def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
        """``preadv`` straight into the buffers: a run of small arrays is one system call, no copy."""
        fd = os.open(self._path(full_key), os.O_RDONLY)
        try:
            pending = list(outs)
            position = offset
            while pending:
                n = os.preadv(fd, pending[:_IOV_MAX], position)
                if n == 0:  # the file ends before the range does: say where it really ends
                    left = sum(out.nbytes for out in pending)
                    raise InvalidRangeError(
                        f"{self._url_of_full(full_key)} ends at byte {os.fstat(fd).st_size}, "
                        f"{left} bytes short of the range it was asked for (bytes {offset}-{position + left - 1})",
                        self._url_of_full(full_key))
                position += n
                pending = _advance(pending, n)
        finally:
            os.close(fd)

    def _list(self, full_prefix: str) -> Iterator[ObjectMeta]:
        directory, _, name_start = full_prefix.rpartition("/")
        base = self._path(directory) if directory else self.root
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if not entry.name.startswith(name_start):
                continue
            rel = f"{directory}/{entry.name}" if directory else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), rel)
            elif entry.is_file(follow_symlinks=False):
                yield self._meta_from_entry(entry, rel)

    def _walk(self, path: Path, rel: str) -> Iterator[ObjectMeta]:
        for dirpath, _dirnames, filenames in os.walk(path):
            rel_dir = rel + dirpath[len(str(path)):].replace(os.sep, "/")
            for name in filenames:
                full = os.path.join(dirpath, name)
                st = os.stat(full, follow_symlinks=False)
                if _is_regular(st.st_mode):
                    yield ObjectMeta(key=f"{rel_dir}/{name}", size=st.st_size,
                                     last_modified=datetime.fromtimestamp(st.st_mtime, timezone.utc))

    @staticmethod
    def _meta_from_entry(entry: os.DirEntry[str], rel: str) -> ObjectMeta:
        st = entry.stat(follow_symlinks=False)
        return ObjectMeta(key=rel, size=st.st_size,
                          last_modified=datetime.fromtimestamp(st.st_mtime, timezone.utc))

    # ------------------------------------------------------------------ writes
    def _put_whole(self, full_key: str, buffers: Sequence[memoryview], mode: WriteMode,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        temp, fd = self._open_temp(full_key)
        try:
            try:
                _write_all(fd, buffers)
                return self._finish(fd, temp, full_key, mode, metadata)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            self._tidy_temp_dir()

    def _begin_multipart(self, full_key: str, mode: WriteMode, metadata: Mapping[str, str],
                         size: int, part_size: int) -> MultipartUpload:
        return _LocalMultipart(self, full_key, mode, metadata, size, part_size)

    def _open_temp(self, full_key: str) -> tuple[Path, int]:
        """A new temporary file (path, descriptor open for writing) for an object of ``full_key``.

        Bounded retry: another writer's ``_tidy_temp_dir`` may remove the (empty) directory
        between our ``mkdir`` and ``open``.
        """
        temp_dir = self.root / TEMP_PREFIX
        for _ in range(_TEMP_DIR_ATTEMPTS):
            _make_dirs(temp_dir, self._url_of_full(full_key))
            temp = temp_dir / f"{uuid.uuid4().hex}{TEMP_SUFFIX}"
            try:
                return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                continue
        raise StorageError(f"cannot write {self._url_of_full(full_key)}: {temp_dir} keeps disappearing",
                           self._url_of_full(full_key))

    def _tidy_temp_dir(self) -> None:
        """Remove ``.cloudckpt-tmp/`` if it is empty (another write's file, or a crash's, keeps it)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.root / TEMP_PREFIX)

    def _finish(self, fd: int, temp: Path, full_key: str, mode: WriteMode,
                metadata: Mapping[str, str]) -> ObjectMeta:
        """Stamp version + metadata, fsync, and move the temp file into place per ``mode``."""
        self._stamp(fd, metadata)
        os.fsync(fd)
        target = self._path(full_key)
        for _ in range(_TEMP_DIR_ATTEMPTS):  # a delete may tidy away an emptied spread directory meanwhile
            _make_dirs(target.parent, self._url_of_full(full_key))
            try:
                self._move_into_place(temp, target, full_key, mode)
                break
            except FileNotFoundError:
                if target.parent.is_dir():
                    raise
        else:
            raise StorageError(f"cannot write {self._url_of_full(full_key)}: {target.parent} keeps disappearing",
                               self._url_of_full(full_key))
        _fsync_directory(target.parent)
        return self._head(full_key)

    def _move_into_place(self, temp: Path, target: Path, full_key: str, mode: WriteMode) -> None:
        with _directory_lock(target.parent):
            if mode == "create":
                try:
                    os.link(temp, target)
                except FileExistsError:
                    raise AlreadyExistsError(f"{self._url_of_full(full_key)} already exists",
                                             self._url_of_full(full_key)) from None
            else:
                if isinstance(mode, UpdateVersion):
                    self._check_version(full_key, mode.version)
                os.rename(temp, target)

    def _check_version(self, full_key: str, expected: str) -> None:
        try:
            current = self._head(full_key).version
        except FileNotFoundError:
            raise PreconditionError(f"{self._url_of_full(full_key)} does not exist (expected version "
                                    f"{expected})", self._url_of_full(full_key)) from None
        if current != expected:
            raise PreconditionError(f"{self._url_of_full(full_key)} is at version {current}, not {expected}: "
                                    "another writer replaced it", self._url_of_full(full_key))

    def _stamp(self, fd: int, metadata: Mapping[str, str]) -> None:
        if not self._has_xattrs(fd):
            return
        os.setxattr(fd, _VERSION_XATTR, uuid.uuid4().hex.encode())
        if metadata:
            os.setxattr(fd, _META_XATTR, json.dumps(dict(metadata), sort_keys=True).encode())

    def _has_xattrs(self, fd: int) -> bool:
        with self._xattr_lock:
            if self._xattrs is None:
                try:
                    os.setxattr(fd, _VERSION_XATTR, b"probe")
                    self._xattrs = True
                except OSError:
                    self._xattrs = False
            return self._xattrs

    def _version_of(self, fd: int, st: os.stat_result) -> str:
        try:
            return os.getxattr(fd, _VERSION_XATTR).decode()
        except OSError:
            return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"

    @staticmethod
    def _metadata_of(fd: int) -> dict[str, str]:
        try:
            raw = os.getxattr(fd, _META_XATTR)
        except OSError:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    def _delete_many(self, full_keys: Sequence[str]) -> None:
        parents = set()
        for key in full_keys:
            path = self._path(key)
            try:
                os.unlink(path)
                parents.add(path.parent)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                pass
        for parent in parents:
            _fsync_directory(parent)
            self._tidy_spread_dir(parent)
        if self.root / TEMP_PREFIX.rstrip("/") in parents:  # cleanup of a killed writer's temporaries
            self._tidy_temp_dir()

    def _tidy_spread_dir(self, directory: Path) -> None:
        """Remove a checkpoint's ``<name>.d/<hh>/`` (then ``<name>.d/``) once its last object is gone.

        Why: a spread checkpoint copied to local disk (``cloudckpt cp``) would otherwise leave
        empty directories behind when it is evicted. ``rmdir`` only removes an empty one, and a
        writer whose directory vanished before its move makes it again (``_finish``).
        """
        if not (len(directory.name) == 2 and directory.parent.name.endswith(SPREAD_INFIX.rstrip("/"))
                and directory.parent.parent.is_relative_to(self.root)):
            return
        for empty in (directory, directory.parent):
            try:
                os.rmdir(empty)
            except OSError:
                return

    # ------------------------------------------------------------------ errors
    def _is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno in (errno.EINTR, errno.EAGAIN)

    def _translate(self, exc: BaseException, url: str) -> BaseException:
        return translate_os_error(exc, url)


#: How often a write re-creates a temporary directory that concurrent tidying removed.
_TEMP_DIR_ATTEMPTS = 16


def _make_dirs(directory: Path, url: str) -> None:
    """``mkdir -p directory``, with errors that say what is in the way (not "not found").

    ``exist_ok`` checks "is it a directory?" after ``mkdir`` failed; a directory that
    another writer's tidying removed in between looks like a file there, so that case is
    tried again (bounded) instead of reported.
    """
    for _ in range(_TEMP_DIR_ATTEMPTS):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return
        except (FileExistsError, NotADirectoryError):
            blocker = file_in_the_way(directory)
            if blocker is not None:
                raise StorageError(f"cannot write {url}: {blocker} is a file, not a directory", url) from None
        except PermissionError as exc:
            raise PermissionDeniedError(
                f"cannot write {url}: permission denied creating directory {exc.filename or directory}", url) from exc
        except OSError as exc:
            raise StorageError(f"cannot write {url}: cannot create directory {exc.filename or directory}: "
                               f"{exc.strerror or exc} (not a writable file system?)", url) from exc
    raise StorageError(f"cannot write {url}: {directory} keeps disappearing", url)


class _LocalMultipart(MultipartUpload):
    """Parts land by ``pwrite`` at their offsets in one preallocated temp file."""

    def __init__(self, storage: LocalStorage, full_key: str, mode: WriteMode,
                 metadata: Mapping[str, str], size: int, part_size: int) -> None:
        self._storage = storage
        self._key = full_key
        self._mode = mode
        self._metadata = metadata
        self._part_size = part_size
        self._temp, self._fd = storage._open_temp(full_key)
        self._result: ObjectMeta | None = None
        try:
            os.ftruncate(self._fd, size)
        except BaseException:
            self._cleanup()
            raise

    def upload_part(self, index: int, pieces: Sequence[memoryview]) -> None:
        offset = index * self._part_size
        for piece in pieces:
            written = 0
            while written < piece.nbytes:
                written += os.pwrite(self._fd, piece[written:], offset + written)
            offset += piece.nbytes

    def complete(self) -> ObjectMeta:
        """Move the filled temp file into place; safe to retry (the base class retries transient errors).

        A failed attempt keeps the temp file for the retry (``abort`` removes it); a retry
        after an attempt that finished returns that attempt's result.
        """
        if self._result is None:
            self._result = self._storage._finish(self._fd, self._temp, self._key, self._mode, self._metadata)
            self._cleanup()
        return self._result

    def abort(self) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temp)
        self._storage._tidy_temp_dir()


def _advance(buffers: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``buffers`` once their first ``n`` bytes are filled."""
    i = 0
    while i < len(buffers) and n >= buffers[i].nbytes:
        n -= buffers[i].nbytes
        i += 1
    rest = buffers[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


def _write_all(fd: int, buffers: Sequence[memoryview]) -> None:
    for buf in buffers:
        written = 0
        while written < buf.nbytes:
            written += os.write(fd, buf[written:])


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Exclusive ``flock`` on a directory: serialises commits into it, dies with the process."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _fsync_directory(directory: Path) -> None:
    """Make a rename/link/unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
