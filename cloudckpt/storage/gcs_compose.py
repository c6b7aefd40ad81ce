"""The GCS parallel composite upload: parts as temporary objects, then ``compose``.

Split out of ``gcs`` (issue 23): the base class's multipart writer drives it (``upload_part``
on pool threads, then ``complete`` or ``abort``); ``GCSStorage`` only starts one.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cloudckpt.storage.extras import missing_extra

try:
    import google.cloud.storage as gcs
    from google.api_core import exceptions as api_exceptions
except ImportError as _missing:  # google-cloud-storage is the install extra cloudckpt[gcs]
    raise missing_extra("gcs", _missing) from _missing

from cloudckpt.errors import ChecksumError
from cloudckpt.storage.base import MultipartUpload
from cloudckpt.storage.checksum import crc32c_base64, crc32c_combine
from cloudckpt.storage.gcs_client import TIMEOUT, meta_from_blob
from cloudckpt.storage.gcs_errors import generation_match, precondition_error
from cloudckpt.storage.transfer import body_crc32c
from cloudckpt.storage.values import ObjectMeta, WriteMode

if TYPE_CHECKING:
    from cloudckpt.storage.gcs import GCSStorage

#: GCS composes at most this many sources in one call.
MAX_COMPOSE_SOURCES = 32
#: Metadata of a composite upload's chunk objects: the key they are a part of (for whoever
#: finds a leftover chunk, and for tests that fault one object's parts).
PART_OF_KEY = "cloudckpt-part-of"


@dataclass
class _Part:
    name: str
    size: int
    crc32c: int


class CompositeUpload(MultipartUpload):
    """A parallel composite upload: parts as temporary objects, then compose.

    ``upload_part`` runs on pool threads; each part is a simple upload of a temporary
    object (retries overwrite it, so they are idempotent). ``complete`` composes the
    parts - through intermediate temporary composites when there are more than 32 -
    into the final key with the generation precondition of the write mode, then
    deletes every temporary object. ``abort`` deletes them too, tolerating parts that
    never arrived. A retried ``complete`` skips the intermediate composites it already
    made.
    """

    def __init__(self, storage: GCSStorage, full_key: str, mode: WriteMode,
                 metadata: Mapping[str, str]) -> None:
        self._storage = storage
        self._full_key = full_key
        self._mode = mode
        self._metadata = dict(metadata)
        self._id = uuid.uuid4().hex
        self._parts: dict[int, _Part] = {}
        self._intermediates: list[str] = []
        self._composed: set[str] = set()
        self._lock = threading.Lock()

    def upload_part(self, index: int, pieces: Sequence[memoryview]) -> None:
        name = self._storage._temp_name(self._id, f"part-{index:06d}")
        size = sum(p.nbytes for p in pieces)
        with self._lock:
            self._parts[index] = _Part(name, size, -1)  # registered first: abort finds it
        self._storage._upload(name, pieces, generation_match=None, metadata={PART_OF_KEY: self._full_key},
                              storage_class="STANDARD")
        with self._lock:
            self._parts[index] = _Part(name, size, body_crc32c(pieces))

    def _temp_names(self) -> list[str]:
        with self._lock:
            return [p.name for p in self._parts.values()] + list(self._intermediates)

    def complete(self) -> ObjectMeta:
        storage = self._storage
        url = storage._url_for_full(self._full_key)
        parts = [self._parts[i] for i in sorted(self._parts)]
        sources = [p.name for p in parts]
        level = 0
        while len(sources) > MAX_COMPOSE_SOURCES:
            next_level = []
            for group_index, start in enumerate(range(0, len(sources), MAX_COMPOSE_SOURCES)):
                group = sources[start:start + MAX_COMPOSE_SOURCES]
                if len(group) == 1:
                    next_level.append(group[0])
                    continue
                name = storage._temp_name(self._id, f"compose-{level}-{group_index:06d}")
                if name not in self._composed:
                    with self._lock:
                        if name not in self._intermediates:
                            self._intermediates.append(name)
                    self._compose(storage._blob(name), group, generation_match=None)
                    self._composed.add(name)
                next_level.append(name)
            sources = next_level
            level += 1
        final = storage._blob(self._full_key)
        final.metadata = self._metadata
        final.content_type = "application/octet-stream"
        if storage.storage_class is not None:
            final.storage_class = storage.storage_class
        try:
            self._compose(final, sources, generation_match=generation_match(self._mode))
        except api_exceptions.PreconditionFailed as exc:
            # Over either way: another writer won, or an earlier attempt of ours landed
            # (the base class checks the writer nonce). The parts are no longer needed.
            storage._delete_quietly(self._temp_names())
            raise precondition_error(self._mode, url) from exc
        storage._delete_quietly(self._temp_names())
        self._check_crc32c(final, parts, url)
        return meta_from_blob(final)

    def _compose(self, destination: gcs.Blob, sources: Sequence[str], generation_match: int | None) -> None:
        bucket = self._storage._bucket()
        destination.compose([bucket.blob(name) for name in sources], if_generation_match=generation_match,
                            timeout=TIMEOUT, retry=None)

    @staticmethod
    def _check_crc32c(final: gcs.Blob, parts: Sequence[_Part], url: str) -> None:
        """Compare the composite's CRC32C with the one combined from the parts (no data pass)."""
        if final.crc32c is None:
            return
        combined = parts[0].crc32c
        for part in parts[1:]:
            combined = crc32c_combine(combined, part.crc32c, part.size)
        if final.crc32c != crc32c_base64(combined):
            raise ChecksumError(f"{url}: composite object has CRC32C {final.crc32c}, "
                                f"its parts combine to {crc32c_base64(combined)}")

    def abort(self) -> None:
        names = self._temp_names()
        if names:
            self._storage._delete_quietly(names)
