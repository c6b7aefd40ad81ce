"""TensorFlow's on-disk key/value table (the ``.index`` of a TensorBundle), read from bytes.

The format is LevelDB's SSTable as TensorFlow keeps it in ``tsl/lib/io`` (``format.cc``,
``block.cc``, ``table_builder.cc``)::

    [data block][trailer] ... [metaindex block][trailer] [index block][trailer] [footer]

    trailer  = 1 byte compression type (0: none, 1: snappy) + fixed32 masked CRC32C of
               the block's bytes and that type byte
    footer   = metaindex handle, index handle (each: varint64 offset, varint64 size),
               zero-padded to 40 bytes, then the fixed64 magic 0xdb4775248b80fb57
    block    = entries, then fixed32 restart offsets, then fixed32 restart count
    entry    = varint32 shared key bytes, varint32 unshared, varint32 value length,
               the unshared key bytes, the value (keys are prefix-compressed and reset to
               shared=0 at every restart point)

The index block maps a separator key per data block to that block's handle. TensorBundle
writes uncompressed blocks (``tensor_bundle.cc`` sets ``kNoCompression``); a snappy block
is refused with a clear error rather than a new dependency.

Hostile input: every handle must lie inside the file and blocks may not overlap; every
block's CRC is checked before it is parsed; keys must be strictly increasing across the
whole table; each entry consumes at least three bytes. Prefix compression lets ``n`` stored
bytes spell keys of ``n^2 / 2`` bytes (each key one byte longer than the one before, one
restart point for the block), so the keys' expanded length is bounded too: TensorFlow
stores a full key at least every 16 entries (``block_restart_interval``), and a key is no
longer than the bytes stored since its restart point, so its tables spell at most 16 bytes
of keys per byte of table; a table that spells more is refused. Time and memory are
therefore ``O(n)`` for a table of ``n`` bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format.sniff import TF_FOOTER_SIZE, TF_TABLE_MAGIC, looks_like_tf_table
from cloudckpt.storage.checksum import crc32c_of
from cloudckpt.tfbundle.crc import unmask
from cloudckpt.tfbundle.wire import read_varint

MAGIC_BYTES = TF_TABLE_MAGIC  # the format layer's sniffer tells tables apart by it (cloudckpt.format.sniff)
FOOTER_SIZE = TF_FOOTER_SIZE
TRAILER_SIZE = 5
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1
#: Bytes of expanded keys a table may spell per byte of its own: TensorFlow's restart
#: interval (a table it writes spells at most this many; see the module docs).
KEY_EXPANSION = 16


looks_like_table = looks_like_tf_table


class _Blocks:
    """Reads blocks of one table, checking that no two overlap and each is inside the file."""

    def __init__(self, data: bytes, url: str) -> None:
        self.data = data
        self.url = url
        self.limit = len(data) - FOOTER_SIZE
        self._index: tuple[int, int] = (0, 0)
        self._next = 0  # data blocks come in file order, one after the other

    def fail(self, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"malformed TensorFlow checkpoint index {self.url}: {problem}")

    def handle(self, data: bytes, pos: int, what: str) -> tuple[int, int, int]:
        """``(offset, size, position after)`` of the block handle at ``pos`` of ``data``."""
        offset, pos = read_varint(data, pos, f"{self.url}: {what} handle")
        size, pos = read_varint(data, pos, f"{self.url}: {what} handle")
        return offset, size, pos

    def read(self, offset: int, size: int, what: str, *, index: bool = False) -> bytes:
        """The contents of a block, its trailer CRC checked; uncompressed blocks only.

        The index block is read first; data blocks must then follow one another in file
        order without overlapping each other or the index block (as TensorFlow writes them),
        which keeps the check linear.
        """
        if offset > self.limit or size > self.limit - offset or self.limit - offset - size < TRAILER_SIZE:
            raise self.fail(f"{what} [{offset}, +{size}) runs past the end of the table ({self.limit} bytes "
                            "before the footer): truncated?")
        end = offset + size + TRAILER_SIZE
        if index:
            self._index = (offset, end)
        elif offset < self._next or (offset < self._index[1] and self._index[0] < end):
            raise self.fail(f"{what} [{offset}, +{size}) overlaps another block or is out of order")
        else:
            self._next = end
        kind = self.data[offset + size]
        (stored,) = struct.unpack_from("<I", self.data, offset + size + 1)
        actual = crc32c_of([self.data[offset:offset + size + 1]])
        if actual != unmask(stored):
            raise self.fail(f"{what} at byte {offset} fails its CRC32C (recorded {unmask(stored):08x}, "
                            f"read {actual:08x})")
        if kind == SNAPPY_COMPRESSION:
            raise self.fail(f"{what} is snappy-compressed; TensorFlow writes checkpoint indexes "
                            "uncompressed and cloudckpt reads only those")
        if kind != NO_COMPRESSION:
            raise self.fail(f"{what} has unknown compression type {kind}")
        return self.data[offset:offset + size]


def block_entries(block: bytes, what: str, url: str) -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` of every entry of one block, keys rebuilt from their shared prefixes."""
    where = f"{url}: {what}"

    def bad(problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"malformed TensorFlow checkpoint index {url}: {what}: {problem}")

    if len(block) < 4:
        raise bad("shorter than its restart count")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    if restarts > (len(block) - 4) // 4:
        raise bad(f"claims {restarts} restart points, more than fit in {len(block)} bytes")
    end = len(block) - 4 - 4 * restarts
    points = set(struct.unpack_from(f"<{restarts}I", block, end)) if restarts else set()
    if end > 0 and (0 not in points or any(p >= end for p in points)):
        raise bad("restart points outside the entries")
    pos = 0
    key = b""
    while pos < end:
        start = pos
        shared, pos = read_varint(block, pos, where)
        unshared, pos = read_varint(block, pos, where)
        length, pos = read_varint(block, pos, where)
        if shared > len(key):
            raise bad(f"entry at byte {start} shares {shared} bytes of a {len(key)}-byte key")
        if start in points and shared != 0:
            raise bad(f"entry at restart point {start} shares a prefix")
        if unshared > end - pos or length > end - pos - unshared:
            raise bad(f"entry at byte {start} runs past the block's entries")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + length]
        pos += length


def read_table(data: bytes, url: str) -> Iterator[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of a table, in key order, every block verified before its entries.

    An iterator, so that a caller keeping each entry in another form (the bundle's decoded
    entries) never also holds every raw key.

    Raises:
        CheckpointFormatError: not a table (no magic: truncated?), a block that fails its
            CRC32C or lies outside the file, a malformed block, keys out of order, keys that
            spell more than ``KEY_EXPANSION`` bytes per byte of the table.
    """
    if not looks_like_table(data):
        raise CheckpointFormatError(
            f"{url} is not a TensorFlow checkpoint index: it does not end in the table magic number "
            f"({len(data)} bytes; truncated?)")
    blocks = _Blocks(data, url)
    footer = data[-FOOTER_SIZE:]
    _, _, pos = blocks.handle(footer, 0, "metaindex block")  # TensorBundle's metaindex is empty: unused
    index_offset, index_size, _ = blocks.handle(footer, pos, "index block")
    index = blocks.read(index_offset, index_size, "index block", index=True)
    previous: bytes | None = None
    budget = KEY_EXPANSION * len(data)
    for n, (separator, handle) in enumerate(block_entries(index, "index block", url=url)):
        budget -= len(separator)  # the index block's keys are prefix-compressed too
        if budget < 0:
            raise _overspelled(blocks, "index block", len(separator))
        offset, size, after = blocks.handle(handle, 0, f"data block {n}")
        if after != len(handle):
            raise blocks.fail(f"index entry {n} holds {len(handle) - after} bytes after its block handle")
        for key, value in block_entries(blocks.read(offset, size, f"data block {n}"), f"data block {n}", url=url):
            budget -= len(key)
            if budget < 0:
                raise _overspelled(blocks, f"data block {n}", len(key))
            if previous is not None and key <= previous:
                raise blocks.fail(f"keys out of order in data block {n}: {key[:80]!r} after {previous[:80]!r}")
            previous = key
            yield key, value


def _overspelled(blocks: _Blocks, what: str, size: int) -> CheckpointFormatError:
    return blocks.fail(f"its prefix-compressed keys spell more than {KEY_EXPANSION} bytes per byte of the table "
                       f"({what}, key of {size} bytes); TensorFlow stores a full key at least every 16 entries")
