"""The storage layer's value types and constants: what callers pass and get back.

Frozen, slotted dataclasses (zarr v3's style): a write mode, object metadata, byte ranges,
read requests and the transfer tuning. No behaviour beyond validating themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Union

from cloudckpt.errors import InvalidRangeError
from cloudckpt.storage.retry import RetryPolicy

#: User-metadata field that tags each write with a per-call nonce; lets a retried
#: conditional write tell "my first attempt landed" from "someone else wrote".
WRITER_NONCE_KEY = "cloudckpt-writer"

#: Where a backend keeps temporary objects (GCS compose chunks, write probes), under the
#: storage root. Names there end in TEMP_SUFFIX too, so bucket lifecycle rules can expire
#: them by prefix (S3) or by suffix (GCS ``matches_suffix``) - see terraform/.
TEMP_PREFIX = ".cloudckpt-tmp/"
TEMP_SUFFIX = ".cloudckpt-tmp"
#: Scratch objects of capability probes (S3's conditional-write probe), under TEMP_PREFIX.
PROBE_PREFIX = f"{TEMP_PREFIX}probe-"

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True, slots=True)
class UpdateVersion:
    """Write mode: replace the object only if its current version is ``version``.

    ``version`` is what ``head`` returned: the ETag on S3, the generation on GCS, a
    (mtime, size, inode) token on local disk.
    """

    version: str


WriteMode = Union[Literal["overwrite", "create"], UpdateVersion]  # noqa: UP007 - runtime alias on 3.10


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What ``head`` and ``list`` know about one object. ``key`` is relative to the root."""

    key: str
    size: int
    version: str | None = None
    last_modified: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A byte range of an object; build it with one of the class methods.

    ``bounded(start, end)`` is ``[start, end)``; ``from_offset(start)`` runs to the end;
    ``suffix(n)`` is the last ``n`` bytes. A bounded range that runs past the end of the
    object is an error (``InvalidRangeError``), not a silently short read.
    """

    start: int | None = None
    end: int | None = None
    suffix_length: int | None = None

    @classmethod
    def bounded(cls, start: int, end: int) -> ByteRange:
        return cls(start=start, end=end)

    @classmethod
    def from_offset(cls, start: int) -> ByteRange:
        return cls(start=start)

    @classmethod
    def suffix(cls, length: int) -> ByteRange:
        return cls(suffix_length=length)

    def validate(self, url: str) -> None:
        """Reject negative, inverted or empty-kind ranges before any request is made."""
        if self.suffix_length is not None:
            if self.start is not None or self.end is not None or self.suffix_length < 0:
                raise InvalidRangeError(f"invalid suffix range {self} for {url}", url)
            return
        if self.start is None or self.start < 0:
            raise InvalidRangeError(f"byte range start must be >= 0, got {self.start} for {url}", url)
        if self.end is not None and self.end < self.start:
            raise InvalidRangeError(
                f"inverted byte range [{self.start}, {self.end}) for {url}", url)

    def http_header(self) -> str:
        """The ``Range`` header value (HTTP ranges are inclusive at the end)."""
        if self.suffix_length is not None:
            return f"bytes=-{self.suffix_length}"
        if self.end is None:
            return f"bytes={self.start}-"
        return f"bytes={self.start}-{self.end - 1}"

    @property
    def length(self) -> int | None:
        """Expected length when known without the object's size."""
        if self.end is not None and self.start is not None:
            return self.end - self.start
        return None


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Read ``len(out)`` bytes of ``key`` starting at ``offset`` straight into ``out``.

    ``done``, if given, runs once on the pool thread that landed the last byte of ``out``,
    before ``read_into`` returns: a restore verifies each range's CRC32C there, in parallel
    with the reads still in flight, instead of in one pass on one thread after all of them.
    An exception it raises fails the ``read_into`` like a failed read. Readers that fill
    requests some other way (the distributed relay) may not call it; callers check.
    """

    key: str
    offset: int
    out: memoryview
    done: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """Tuning of the multipart writer and ranged reader.

    Defaults were chosen by ``bench/bench_storage.py`` on a 2-core machine (see
    docs/benchmarks.md): with few cores, more threads are not automatically faster.

    Attributes:
        multipart_threshold: objects larger than this are written in parts.
        part_size: bytes per part (S3 raises it to fit 10,000 parts).
        max_concurrency: parallel requests per storage object (threads in its pool).
        read_chunk_size: a ranged read larger than this is split into parallel GETs.
        max_bandwidth: optional cap in bytes/second for each direction.
        retry: how transient failures are retried.
    """

    multipart_threshold: int = 64 * MiB
    part_size: int = 32 * MiB
    max_concurrency: int = 4
    read_chunk_size: int = 64 * MiB
    max_bandwidth: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name in ("multipart_threshold", "part_size", "max_concurrency", "read_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransferConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_bandwidth is not None and self.max_bandwidth < 1:
            raise ValueError(f"TransferConfig.max_bandwidth must be >= 1, got {self.max_bandwidth}")
