"""What one host's local tier directory holds: steps, their manifests, verified objects, the owner.

Layout of ``LocalTier.path`` (a plain ``LocalStorage`` - temp file, fsync, rename - so an
object is whole or absent even across a power cut)::

    ckpt-7.index, ckpt-7.data-*        cloudckpt's format, as the pipeline wrote it (and replicas
                                       of peers' data objects, under the same write-unique names)
    tier/ckpt-7.json                   the manifest: this host's local commit of step 7
    tier/owner.json                    which incarnation owns this directory, and the fenced ones
    tier/pieces/<data object>          the whole arrays of a peer's object a resume fetched (sparse)

The manifest is written only once every host's shards are on the host and its replicas;
it records the writer's incarnation token, which rank wrote which data object, and the
CRC32C of the index bytes - so a resume accepts neither a step a fenced zombie wrote nor an
index a zombie replaced under a manifest of ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import CloudCkptError, ConcurrentWriterError, NotFoundError, PreconditionError
from cloudckpt.format import INDEX_SUFFIX, ArrayEntry, CheckpointIndex, index_key
from cloudckpt.format.decode import decode_index
from cloudckpt.format.naming import object_checkpoint
from cloudckpt.storage import ByteRange, ObjectMeta, UpdateVersion
from cloudckpt.storage.checksum import crc32c_of
from cloudckpt.storage.local import LocalStorage

log = logging.getLogger("cloudckpt.manager.tiers")

MANIFEST_DIR = "tier/"
OWNER_KEY = "tier/owner.json"
#: Pieces of other hosts' objects (the whole arrays in them) a resume fetched: ``put_pieces``.
PIECES_DIR = "tier/pieces/"


def manifest_key(name: str) -> str:
    return f"{MANIFEST_DIR}{name}.json"


def step_of(name: str) -> int:
    """The number of ``ckpt-7`` (``-1`` when the name has none)."""
    number = name.rpartition("-")[2]
    return int(number) if number.isdigit() else -1


@dataclass(frozen=True, slots=True)
class Manifest:
    """One host's record that step ``name`` committed on every host and its replicas."""

    name: str
    token: str
    index_crc32c: int
    owners: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps({"name": self.name, "token": self.token, "index_crc32c": self.index_crc32c,
                           "owners": self.owners}, sort_keys=True).encode()

    @staticmethod
    def parse(data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            owners = {str(k): int(v) for k, v in dict(raw["owners"]).items()}
            return Manifest(str(raw["name"]), str(raw["token"]), int(raw["index_crc32c"]), owners)
        except (ValueError, KeyError, TypeError) as exc:
            raise CloudCkptError(f"local tier manifest {where} is unreadable: {exc}") from exc


class HostDirectory(LocalStorage):
    """A host's local tier directory, named ``shown`` in URLs (by default its path).

    A multi-host save requires every host to name the same place (``saving/plan.py``); on a
    cluster every host passes the same path, but several processes on one machine need
    directories of their own - they share one name (their common parent) instead.
    """

    def __init__(self, path: str | os.PathLike[str], shown: str | None = None) -> None:
        super().__init__(os.fspath(path))
        if shown is not None:
            self._url = shown

    def put_pieces(self, key: str, size: int, ranges: Sequence[tuple[int, int]], data: NDArray[np.uint8]) -> None:
        """Keep only ``ranges`` of object ``key`` (``data``: their bytes, in order), under ``tier/pieces/``.

        A sparse file of the object's size (temp file, fsync, rename): reads of ``key`` find it
        while the whole object is absent (``_readable``), so a restore reads the ranges it needs;
        ``data_objects``, ``verified`` and a persist never see it - it is no copy of the object.
        """
        target = self.root / PIECES_DIR / key
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(temp, "wb") as f:
            f.truncate(size)
            position = 0
            for offset, length in ranges:
                os.pwrite(f.fileno(), data[position:position + length].data, offset)
                position += length
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)

    def read_array(self, key: str, ranges: Sequence[tuple[int, int]]) -> NDArray[np.uint8]:
        """``ranges`` of object ``key``, in order, read into one new writable array."""
        out = np.empty(sum(n for _, n in ranges), dtype=np.uint8)
        with open(self.root / key, "rb") as f:
            position = 0
            for offset, length in ranges:
                if os.preadv(f.fileno(), [out[position:position + length].data], offset) != length:
                    raise NotFoundError(f"{self.url_for(key)} is shorter than recorded", self.url_for(key))
                position += length
        return out

    def map_for_sending(self, key: str, size: int) -> NDArray[np.uint8]:
        """Object ``key`` (``size`` bytes, as recorded) as a copy-on-write mapping: writable (what
        ``Coordinator.transfer`` sends without a copy) yet never written - the transfer reads the
        page cache, with no read into a new array."""
        path = self.root / key
        if not path.is_file() or path.stat().st_size != size:
            raise NotFoundError(f"{self.url_for(key)} is absent or not of its recorded size {size}", self.url_for(key))
        if size == 0:
            return np.empty(0, dtype=np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="c", shape=(size,))

    def land(self, key: str, size: int) -> Landing:
        """A new file for object ``key`` that a transfer receives into directly (see ``Landing``)."""
        return Landing(self, key, size)

    def _readable(self, full_key: str) -> str:
        if not (self.root / full_key).exists() and (self.root / PIECES_DIR / full_key).exists():
            return PIECES_DIR + full_key
        return full_key

    def _head(self, full_key: str) -> ObjectMeta:
        return super()._head(self._readable(full_key))

    def _get_range(self, full_key: str, byte_range: ByteRange | None) -> bytes:
        return super()._get_range(self._readable(full_key), byte_range)

    def _read_into(self, full_key: str, offset: int, outs: Sequence[memoryview]) -> None:
        super()._read_into(self._readable(full_key), offset, outs)

    @contextlib.contextmanager
    def view(self, key: str) -> Iterator[memoryview]:
        """The bytes of ``key``, mapped read-only (no copy: verifying and sending a shard reads the page cache).

        Raises:
            NotFoundError: no such object.
        """
        try:
            f = open(self.root / key, "rb")  # noqa: SIM115 - closed below, after the map
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.url_for(key)} not found", self.url_for(key)) from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                yield memoryview(b"")
                return
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    yield view
                finally:
                    view.release()


class Landing:
    """Where one received object lands: ``array`` maps a new temp file of the directory, so the bytes a
    transfer receives are written to the file once (no buffer in memory, no second write), and
    ``commit`` makes it object ``key`` the way every write does (fsync, rename: whole or absent).

    The space is reserved first (``posix_fallocate``): a full disk is an ``OSError`` here, not a
    SIGBUS on a mapped page. ``abort`` (or a failed ``commit``) removes the temp file.
    """

    def __init__(self, directory: HostDirectory, key: str, size: int) -> None:
        self._directory, self._full_key = directory, directory._prefix + key
        self._temp, self._fd = directory._open_temp(self._full_key)
        try:
            if size:
                os.posix_fallocate(self._fd, 0, size)
                self.array: NDArray[np.uint8] = np.memmap(self._temp, dtype=np.uint8, mode="r+", shape=(size,))
            else:
                self.array = np.empty(0, dtype=np.uint8)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        try:
            self.array = np.empty(0, dtype=np.uint8)  # our map goes; the fsync below covers the pages written
            self._directory._finish(self._fd, self._temp, self._full_key, "overwrite", {})
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1  # once: a descriptor number closed twice may be another file's by then
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temp)
        self._directory._tidy_temp_dir()


class Holdings:
    """One host's local tier directory (a ``HostDirectory``: a ``LocalStorage`` of ``LocalTier.path``)."""

    def __init__(self, storage: HostDirectory) -> None:
        self.storage = storage

    # ---------------------------------------------------------------- owner (fencing)
    def read_owner(self) -> tuple[dict[str, object], str | None]:
        """The owner record (``token``, ``fenced``: token -> last step it may have written) and its version."""
        try:
            meta = self.storage.head(OWNER_KEY)
            return json.loads(self.storage.get(OWNER_KEY)), meta.version
        except NotFoundError:
            return {"token": None, "fenced": {}}, None

    def claim(self, token: str) -> None:
        """Make ``token`` the owner; the previous owner is fenced at the newest step it committed here.

        A zombie of that incarnation then fails its next save here (``check_owner``), and a
        step it committed after this claim is never restored (``acceptable``).
        """
        for _ in range(3):  # bounded: a racing claim is retried twice, then reported
            record, version = self.read_owner()
            if record.get("token") == token:
                return
            fenced = dict(record.get("fenced") or {})  # type: ignore[call-overload]
            old = record.get("token")
            if isinstance(old, str):
                steps = [step_of(m.name) for m in self.manifests() if m.token == old]
                fenced[old] = max(steps, default=-1)
            data = json.dumps({"token": token, "fenced": fenced}, sort_keys=True).encode()
            try:
                self.storage.put(OWNER_KEY, data, mode="create" if version is None else UpdateVersion(version))
                return
            except PreconditionError:  # AlreadyExistsError too: another claim got there first
                continue
        raise ConcurrentWriterError(f"could not claim the local tier {self.storage.url}: another job keeps claiming it")

    def check_owner(self, token: str) -> None:
        """Raise ``ConcurrentWriterError`` unless ``token`` owns this directory."""
        record, _ = self.read_owner()
        if record.get("token") not in (None, token):
            raise ConcurrentWriterError(f"the local tier {self.storage.url} was claimed by a newer job; this "
                                        f"(previous) incarnation may no longer save there")

    def acceptable(self, manifest: Manifest, token: str | None) -> bool:
        """Whether a resume may use ``manifest``: ours, or a fenced incarnation's from before its fence."""
        record, _ = self.read_owner()
        fenced = dict(record.get("fenced") or {})  # type: ignore[call-overload]
        if manifest.token in (token, record.get("token")):
            return True
        return manifest.token in fenced and step_of(manifest.name) <= int(fenced[manifest.token])

    # ---------------------------------------------------------------- steps
    def manifests(self) -> list[Manifest]:
        """Every manifest here, newest step first (unreadable ones skipped with a warning)."""
        found = []
        for meta in self.storage.list(MANIFEST_DIR):
            if not meta.key.endswith(".json") or meta.key == OWNER_KEY:
                continue
            try:
                found.append(Manifest.parse(self.storage.get(meta.key), self.storage.url_for(meta.key)))
            except (CloudCkptError, NotFoundError) as exc:
                log.warning("%s", exc)
        return sorted(found, key=lambda m: step_of(m.name), reverse=True)

    def manifest(self, name: str) -> Manifest | None:
        try:
            return Manifest.parse(self.storage.get(manifest_key(name)), self.storage.url_for(manifest_key(name)))
        except NotFoundError:
            return None

    def data_objects(self, name: str) -> dict[str, int]:
        """The data objects of step ``name`` held here (its own and replicas): key -> size."""
        return {m.key: m.size for m in self.storage.list(name)
                if not m.key.endswith(INDEX_SUFFIX) and object_checkpoint(m.key) == name}

    def index_text(self, name: str, manifest: Manifest) -> str | None:
        """The index of ``name`` held here, if it is the one ``manifest`` committed."""
        try:
            data = self.storage.get(index_key(name))
        except NotFoundError:
            return None
        if crc32c_of([data]) != manifest.index_crc32c:
            log.warning("local tier: %s is not the index its manifest committed; not using it",
                        self.storage.url_for(index_key(name)))
            return None
        return data.decode()

    def verified(self, index: CheckpointIndex, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` held here whose every chunk matches the CRC32C the index records."""
        chunks: dict[int, list[tuple[int, int, int]]] = {}
        for entry in index.entries.values():
            if isinstance(entry, ArrayEntry):
                for chunk in entry.chunks:
                    chunks.setdefault(chunk.object, []).append((chunk.offset, chunk.length, chunk.crc32c))
        position = {obj.name: (i, obj.size) for i, obj in enumerate(index.objects)}
        good = []
        for key in keys:
            if key not in position:
                continue
            i, size = position[key]
            try:
                with self.storage.view(key) as data:
                    bad = len(data) != size or any(crc32c_of([data[off:off + n]]) != crc
                                                   for off, n, crc in chunks.get(i, ()))
            except NotFoundError:
                continue
            if bad:
                log.warning("local tier: %s fails its CRC32C check; it will not be used", self.storage.url_for(key))
                continue
            good.append(key)
        return good

    def decode(self, name: str, text: str) -> CheckpointIndex:
        return decode_index(text.encode(), name, self.storage.url_for(index_key(name)))

    def delete_step(self, name: str) -> None:
        """Manifest first (the step stops counting here), then the index, then every data object held."""
        self.storage.delete(manifest_key(name))
        self.storage.delete(index_key(name))
        self.storage.delete([*self.data_objects(name), *(m.key for m in self.storage.list(PIECES_DIR + name))])
