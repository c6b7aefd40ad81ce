"""A tiny TensorBundle writer for tests: hand-made (and hostile) TensorFlow checkpoints.

Written from TensorFlow's format (tsl/lib/io/table_builder.cc, block_builder.cc,
tensor_bundle.cc), independently of cloudckpt's reader, so that the reader can be fed
what TensorFlow never writes: big-endian bundles, lying sizes and offsets, bad varints,
broken blocks. The real TensorFlow output the reader must match is in tests/tf_fixtures/.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np

MAGIC = 0xDB4775248B80FB57


def crc32c(data: bytes) -> int:
    return int.from_bytes(google_crc32c.Checksum(data).digest(), "big")  # type: ignore[no-untyped-call]


def masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value)


def header(num_shards: int = 1, big_endian: bool = False, producer: int = 1, min_consumer: int = 0) -> bytes:
    version = field_varint(1, producer) + (field_varint(2, min_consumer) if min_consumer else b"")
    return (field_varint(1, num_shards) + (field_varint(2, 1) if big_endian else b"")
            + field_bytes(3, version))


def shape_proto(shape: Sequence[int]) -> bytes:
    return b"".join(field_bytes(2, field_varint(1, n)) for n in shape)


def slice_proto(extents: Sequence[tuple[int, int | None]]) -> bytes:
    out = b""
    for start, length in extents:
        body = (field_varint(1, start) if start else b"") + (field_varint(2, length) if length is not None else b"")
        out += field_bytes(1, body)
    return out


def entry(dtype: int, shape: Sequence[int], *, shard: int = 0, offset: int = 0, size: int = 0, crc: int = 0,
          slices: Sequence[Sequence[tuple[int, int | None]]] = ()) -> bytes:
    out = field_varint(1, dtype) + field_bytes(2, shape_proto(shape))
    if shard:
        out += field_varint(3, shard)
    if offset:
        out += field_varint(4, offset)
    if size:
        out += field_varint(5, size)
    out += field_fixed32(6, masked(crc))
    for extents in slices:
        out += field_bytes(7, slice_proto(extents))
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix of ``a`` and ``b`` (numpy: long keys in tests stay fast)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.frombuffer(a, np.uint8, n) != np.frombuffer(b, np.uint8, n))
    return int(differ[0]) if len(differ) else n


def block(items: Sequence[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out = bytearray()
    restarts = []
    previous = b""
    for n, (key, value) in enumerate(items):
        shared = 0
        if n % restart_interval == 0:
            restarts.append(len(out))
        else:
            shared = _common_prefix(key, previous)
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    if not restarts:
        restarts = [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def with_trailer(contents: bytes, kind: int = 0) -> bytes:
    return contents + bytes([kind]) + struct.pack("<I", masked(crc32c(contents + bytes([kind]))))


def table(items: Sequence[tuple[bytes, bytes]], per_block: int = 1000, restart_interval: int = 16) -> bytes:
    """A whole table: data blocks of ``per_block`` entries, an empty metaindex, the index, the footer.

    ``restart_interval``: entries between full keys in a data block (TensorFlow writes 16).
    """
    out = bytearray()
    index_items = []
    for start in range(0, max(len(items), 1), per_block):
        chunk = items[start:start + per_block]
        if not chunk:
            break
        contents = block(chunk, restart_interval)
        index_items.append((chunk[-1][0] + b"\xff", varint(len(out)) + varint(len(contents))))
        out += with_trailer(contents)
    meta = block([])
    meta_handle = varint(len(out)) + varint(len(meta))
    out += with_trailer(meta)
    index = block(index_items, restart_interval=1)
    index_handle = varint(len(out)) + varint(len(index))
    out += with_trailer(index)
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", MAGIC)
    return bytes(out + footer)


def string_tensor(values: Sequence[bytes], *, big_endian: bool = False) -> tuple[bytes, int]:
    """``(bytes as WriteStringTensor lays them out, the entry's unmasked CRC32C)``."""
    order = ">" if big_endian else "<"
    lengths = b"".join(varint(len(v)) for v in values)
    fixed = b"".join(struct.pack(order + "I", len(v)) for v in values)
    length_crc = struct.pack(order + "I", masked(crc32c(fixed)))
    body = b"".join(values)
    return lengths + length_crc + body, crc32c(fixed + length_crc + body)


@dataclass
class BundleWriter:
    """Tensors appended to shard 0 (or a given shard), then ``write(directory, name)``."""

    big_endian: bool = False
    num_shards: int = 1
    shards: list[bytearray] = field(default_factory=list)
    entries: dict[bytes, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shards = [bytearray() for _ in range(self.num_shards)]

    def add_array(self, key: str, dtype: int, array: np.ndarray, shard: int = 0) -> None:
        data = array.astype(array.dtype.newbyteorder(">" if self.big_endian else "<")).tobytes()
        offset = len(self.shards[shard])
        self.shards[shard] += data
        self.entries[key.encode()] = entry(dtype, array.shape, shard=shard, offset=offset, size=len(data),
                                           crc=crc32c(data))

    def add_strings(self, key: str, values: Sequence[bytes], shape: Sequence[int]) -> None:
        data, crc = string_tensor(values, big_endian=self.big_endian)
        offset = len(self.shards[0])
        self.shards[0] += data
        self.entries[key.encode()] = entry(7, shape, offset=offset, size=len(data), crc=crc)

    def add_raw(self, key: bytes, value: bytes) -> None:
        self.entries[key] = value

    def index(self) -> bytes:
        items = [(b"", header(self.num_shards, self.big_endian)), *sorted(self.entries.items())]
        return table(items)

    def write(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(self.shards):
            (directory / f"{name}.data-{i:05d}-of-{self.num_shards:05d}").write_bytes(bytes(data))
        (directory / f"{name}.index").write_bytes(self.index())
