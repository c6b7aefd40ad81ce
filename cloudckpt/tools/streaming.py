"""Data objects streamed from one store to another, each array chunk's CRC32C checked as the bytes pass.

Objects up to the destination's ``multipart_threshold`` go whole (one GET, one PUT); larger
ones are streamed in parts through ``Storage.put_stream``, ranged GETs from the source
feeding it, so memory stays bounded by the parts in flight. A packed object (only the byte
ranges a checkpoint reads of a larger one, ``ranges.Packing``) is read as those ranges.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from cloudckpt.errors import CheckpointFormatError, InvalidRangeError
from cloudckpt.format import ArrayEntry, CheckpointIndex, Chunk
from cloudckpt.storage import ByteRange, Storage, TransferConfig, open_storage
from cloudckpt.storage.checksum import Crc32c
from cloudckpt.tools.directory import open_directory
from cloudckpt.tools.progress import ProgressSink
from cloudckpt.tools.ranges import Packing
from cloudckpt.tools.verify import Finding

#: S3 refuses parts below 5 MiB (except the last); no store needs smaller ones.
MIN_PART_SIZE = 5 * 1024 * 1024

class ChunkSums:
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


def chunks_by_object(index: CheckpointIndex) -> dict[int, list[tuple[str, Chunk]]]:
    out: dict[int, list[tuple[str, Chunk]]] = {i: [] for i in range(len(index.objects))}
    for path, entry in index.entries.items():
        if isinstance(entry, ArrayEntry):
            for chunk in entry.chunks:
                out[chunk.object].append((path, chunk))
    return out


class Copier:
    """Streams data objects from one store to another through ``Storage.put_stream``."""

    def __init__(self, src: Storage, dst: Storage, progress: ProgressSink) -> None:
        self.src = src
        self.dst = dst
        self.progress = progress
        self.workers = max(1, dst.config.max_concurrency)

    def copies_whole(self, size: int) -> bool:
        """Whether an object of ``size`` bytes goes in one GET and one PUT (held whole in memory)."""
        return size <= self.dst.config.multipart_threshold or not self.dst.supports_multipart

    def copy_object(self, src_key: str, dst_key: str, size: int, sums: ChunkSums,
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


def destination_storage(url: str, part_size: int | None) -> Storage:
    """The destination, with the requested part size (a fresh storage: the cached one keeps its config)."""
    if part_size is None:
        return open_directory(url)
    size = max(part_size, MIN_PART_SIZE)
    return open_storage(url, config=TransferConfig(part_size=size, multipart_threshold=size))
