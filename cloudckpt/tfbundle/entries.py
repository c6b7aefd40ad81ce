"""TensorBundle's index entries: the header, one entry per tensor, dtypes and slices.

The messages (``tensorflow/core/protobuf/tensor_bundle.proto`` and the framework protos
they use), with the field numbers this decoder relies on::

    BundleHeaderProto { int32 num_shards = 1; Endianness endianness = 2 (LITTLE=0, BIG=1);
                        VersionDef version = 3 }
    VersionDef        { int32 producer = 1; int32 min_consumer = 2; repeated int32 bad_consumers = 3 }
    BundleEntryProto  { DataType dtype = 1; TensorShapeProto shape = 2; int32 shard_id = 3;
                        int64 offset = 4; int64 size = 5; fixed32 crc32c = 6 (masked);
                        repeated TensorSliceProto slices = 7 }
    TensorShapeProto  { repeated Dim dim = 2 {int64 size = 1; string name = 2}; bool unknown_rank = 3 }
    TensorSliceProto  { repeated Extent extent = 1 {int64 start = 1; int64 length = 2 (absent: all)} }

The header is the entry with the empty key, first in the table. A partitioned tensor has
one entry with its full shape and ``slices``, and one entry per slice under a key that
encodes the name and the slice (:func:`slice_key`, TensorFlow's ``EncodeTensorNameSlice``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import ml_dtype
from cloudckpt.tfbundle import wire
from cloudckpt.tfbundle.crc import unmask

#: TensorShape::kMaxDimensions.
MAX_NDIM = 254
#: No real tensor has more elements than this (2**53: what a float64 counts exactly).
MAX_ELEMENTS = 1 << 53
#: Slices one partitioned tensor may have (TensorFlow partitions into a few to a few hundred).
MAX_SLICES = 4096
#: The bundle format version this reader understands (``kTensorBundleVersion``).
BUNDLE_VERSION = 1

DT_STRING = 7
DT_RESOURCE = 20
DT_VARIANT = 21

#: TensorFlow DataTypes numpy has -> (TensorFlow's name, numpy dtype). Quantized types are
#: read as the integers they are stored as.
_NATIVE: dict[int, tuple[str, np.dtype[Any]]] = {
    1: ("float32", np.dtype(np.float32)),
    2: ("float64", np.dtype(np.float64)),
    3: ("int32", np.dtype(np.int32)),
    4: ("uint8", np.dtype(np.uint8)),
    5: ("int16", np.dtype(np.int16)),
    6: ("int8", np.dtype(np.int8)),
    8: ("complex64", np.dtype(np.complex64)),
    9: ("int64", np.dtype(np.int64)),
    10: ("bool", np.dtype(np.bool_)),
    11: ("qint8", np.dtype(np.int8)),
    12: ("quint8", np.dtype(np.uint8)),
    13: ("qint32", np.dtype(np.int32)),
    15: ("qint16", np.dtype(np.int16)),
    16: ("quint16", np.dtype(np.uint16)),
    17: ("uint16", np.dtype(np.uint16)),
    18: ("complex128", np.dtype(np.complex128)),
    19: ("float16", np.dtype(np.float16)),
    22: ("uint32", np.dtype(np.uint32)),
    23: ("uint64", np.dtype(np.uint64)),
}
#: TensorFlow DataTypes numpy lacks -> their name, which is also ml_dtypes' name for the type.
_ML: dict[int, str] = {
    14: "bfloat16", 24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 27: "float8_e4m3b11fnuz",
    28: "float8_e5m2fnuz", 29: "int4", 30: "uint4", 31: "int2", 32: "uint2", 33: "float4_e2m1fn",
}


class _DataTypes(Mapping[int, tuple[str, np.dtype[Any]]]):
    """TensorFlow DataType -> (TensorFlow's name, numpy dtype), for every type this machine can read.

    A mapping rather than a dict so that ml_dtypes is imported (~0.5 s for ml_dtypes 0.7)
    only when a bundle holds one of its types, not whenever cloudckpt is imported.
    """

    def __getitem__(self, number: int) -> tuple[str, np.dtype[Any]]:
        if number in _NATIVE:
            return _NATIVE[number]
        name = _ML.get(number)
        dtype = ml_dtype(name) if name is not None else None
        if name is None or dtype is None:
            raise KeyError(number)
        return name, dtype

    def __iter__(self) -> Iterator[int]:
        yield from _NATIVE
        yield from (number for number, name in _ML.items() if ml_dtype(name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


DTYPES: Mapping[int, tuple[str, np.dtype[Any]]] = _DataTypes()
#: dtypes that hold no plain bytes: refused, naming the key.
REFUSED = {DT_RESOURCE: "resource", DT_VARIANT: "variant"}


def readable(number: int) -> bool:
    """Whether tensors of this DataType can be read (numeric, bool, string; not resource/variant)."""
    return number in DTYPES or number == DT_STRING


def dtype_label(number: int) -> str:
    """TensorFlow's name for a DataType number (``float32``, ``string``, ``resource`` ...)."""
    if number in DTYPES:
        return DTYPES[number][0]
    if number == DT_STRING:
        return "string"
    return REFUSED.get(number, f"DataType {number}")


@dataclass(frozen=True, slots=True)
class Header:
    """The bundle's header entry."""

    num_shards: int
    big_endian: bool
    producer: int
    min_consumer: int


@dataclass(frozen=True, slots=True)
class Extent:
    """One dimension of a slice: ``length`` ``None`` means the whole dimension."""

    start: int
    length: int | None


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor (or one slice of a partitioned tensor) as the index describes it.

    ``crc32c`` is the unmasked CRC32C TensorFlow recorded: of the raw bytes for numeric
    tensors, of lengths + length checksum + bytes for strings (see ``strings.py``).
    """

    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[tuple[Extent, ...], ...]

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the values (``object`` for strings: an array of ``bytes``)."""
        if self.dtype == DT_STRING:
            return np.dtype(object)
        return DTYPES[self.dtype][1]


def _fail(url: str, key: str, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"malformed TensorFlow checkpoint index {url}: entry {key!r}: {problem}")


def decode_header(value: bytes, url: str) -> Header:
    """The header entry; refuses unknown versions and impossible shard counts."""
    where = f"{url}: header"
    num_shards, endianness, producer, min_consumer, bad = 0, 0, 0, 0, []
    for field in wire.fields(value, where):
        if field.number == 1:
            num_shards = wire.as_int(field, where, bits=32)
        elif field.number == 2:
            endianness = wire.as_int(field, where, bits=32)
        elif field.number == 3:
            for sub in wire.fields(wire.as_bytes(field, where), where + " version"):
                if sub.number == 1:
                    producer = wire.as_int(sub, where, bits=32)
                elif sub.number == 2:
                    min_consumer = wire.as_int(sub, where, bits=32)
                elif sub.number == 3 and sub.wire_type == wire.VARINT:
                    bad.append(wire.as_int(sub, where, bits=32))
    if not 1 <= num_shards <= 99999:
        raise _fail(url, "", f"num_shards {num_shards} is not in [1, 99999]")
    if endianness not in (0, 1):
        raise _fail(url, "", f"unknown endianness {endianness}")
    if min_consumer > BUNDLE_VERSION or BUNDLE_VERSION in bad:
        raise CheckpointFormatError(
            f"TensorFlow checkpoint {url} needs a reader of bundle version >= {min_consumer} "
            f"(this one reads version {BUNDLE_VERSION}): written by a newer TensorFlow?")
    return Header(num_shards, endianness == 1, producer, min_consumer)


def _decode_shape(data: bytes, url: str, key: str) -> tuple[int, ...]:
    where = f"{url}: entry {key!r} shape"
    dims: list[int] = []
    for field in wire.fields(data, where):
        if field.number == 2:
            size = 0
            for sub in wire.fields(wire.as_bytes(field, where), where):
                if sub.number == 1:
                    size = wire.as_int(sub, where)
            if size < 0:
                raise _fail(url, key, f"dimension {len(dims)} has size {size} (unknown sizes cannot be stored)")
            dims.append(size)
            if len(dims) > MAX_NDIM:
                raise _fail(url, key, f"more than {MAX_NDIM} dimensions")
        elif field.number == 3 and wire.as_int(field, where):
            raise _fail(url, key, "shape of unknown rank")
    shape = tuple(dims)
    if math.prod(shape) > MAX_ELEMENTS:
        raise _fail(url, key, f"shape {list(shape)} has more than 2**53 elements")
    return shape


def _decode_slice(data: bytes, url: str, key: str) -> tuple[Extent, ...]:
    where = f"{url}: entry {key!r} slice"
    extents: list[Extent] = []
    for field in wire.fields(data, where):
        if field.number != 1:
            continue
        start, length = 0, None
        for sub in wire.fields(wire.as_bytes(field, where), where):
            if sub.number == 1:
                start = wire.as_int(sub, where)
            elif sub.number == 2:
                length = wire.as_int(sub, where)
        extents.append(Extent(start, length))
        if len(extents) > MAX_NDIM:
            raise _fail(url, key, f"slice of more than {MAX_NDIM} dimensions")
    return tuple(extents)


def decode_entry(key: str, value: bytes, url: str) -> Entry:
    """One tensor entry, with its own consistency checked (sizes against real objects come later)."""
    where = f"{url}: entry {key!r}"
    dtype, shard, offset, size, crc = 0, 0, 0, 0, 0
    shape: tuple[int, ...] = ()
    slices: list[tuple[Extent, ...]] = []
    for field in wire.fields(value, where):
        number = field.number
        if number == 1:
            dtype = wire.as_int(field, where, bits=32)
        elif number == 2:
            shape = _decode_shape(wire.as_bytes(field, where), url, key)
        elif number == 3:
            shard = wire.as_int(field, where, bits=32)
        elif number == 4:
            offset = wire.as_int(field, where)
        elif number == 5:
            size = wire.as_int(field, where)
        elif number == 6:
            crc = wire.as_fixed32(field, where)
        elif number == 7:
            slices.append(_decode_slice(wire.as_bytes(field, where), url, key))
            if len(slices) > MAX_SLICES:
                raise _fail(url, key, f"more than {MAX_SLICES} slices")
    if offset < 0 or size < 0 or shard < 0:
        raise _fail(url, key, f"negative shard/offset/size ({shard}, {offset}, {size})")
    entry = Entry(key, dtype, shape, shard, offset, size, unmask(crc), tuple(slices))
    if dtype in DTYPES and not slices and size != entry.count * DTYPES[dtype][1].itemsize:
        raise _fail(url, key, f"{size} bytes stored for {dtype_label(dtype)} {list(shape)} "
                              f"({entry.count * DTYPES[dtype][1].itemsize} expected)")
    if dtype == DT_STRING and not slices and size < entry.count + 4 and entry.count:
        raise _fail(url, key, f"{size} bytes cannot hold {entry.count} strings")
    for extents in entry.slices:
        _check_slice(entry, extents, url)
    return entry


def _check_slice(entry: Entry, extents: tuple[Extent, ...], url: str) -> None:
    if len(extents) != len(entry.shape):
        raise _fail(url, entry.key, f"a slice of {len(extents)} dimensions for shape {list(entry.shape)}")
    for d, (extent, n) in enumerate(zip(extents, entry.shape, strict=True)):
        length = n if extent.length is None else extent.length
        if extent.start < 0 or length < 0 or extent.start + length > n:
            raise _fail(url, entry.key, f"slice extent {extent.start}+{length} outside dimension {d} of size {n}")


def slice_box(entry: Entry, extents: tuple[Extent, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, shape)`` of one slice of ``entry`` in the full tensor."""
    start = tuple(e.start for e in extents)
    shape = tuple(n if e.length is None else e.length for e, n in zip(extents, entry.shape, strict=True))
    return start, shape


# ---------------------------------------------------------------------------- slice keys
# TensorFlow's OrderedCode (tensorflow/core/lib/strings/ordered_code.cc), as used by
# EncodeTensorNameSlice: NumIncreasing(0), String(name), NumIncreasing(rank), then per
# dimension SignedNumIncreasing(start), SignedNumIncreasing(length or -1 for "all").

def _num_increasing(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return bytes([len(body)]) + body


def _string(value: bytes) -> bytes:
    return value.replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff") + b"\x00\x01"


def _signed_num_increasing(value: int) -> bytes:
    """Two's complement in ``n`` bytes whose first ``n`` bits are set to 1 (0 for negatives)."""
    magnitude = ~value if value < 0 else value
    length = magnitude.bit_length() // 7 + 1  # n bytes hold 7n - 1 magnitude bits after the header
    raw = bytearray((value & ((1 << 80) - 1)).to_bytes(10, "big")[-length:])
    if length <= 8:
        raw[0] ^= (0xFF << (8 - length)) & 0xFF
    else:
        raw[0] ^= 0xFF
        raw[1] ^= (0xFF << (16 - length)) & 0xFF
    return bytes(raw)


def slice_key(name: str, extents: tuple[Extent, ...]) -> str:
    """The table key TensorFlow stores a slice of tensor ``name`` under (``EncodeTensorNameSlice``)."""
    out = bytearray(_num_increasing(0))
    out += _string(name.encode("utf-8", "surrogateescape"))
    out += _num_increasing(len(extents))
    for extent in extents:
        out += _signed_num_increasing(extent.start)
        out += _signed_num_increasing(-1 if extent.length is None else extent.length)
    return out.decode("utf-8", "surrogateescape")
