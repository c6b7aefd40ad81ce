"""The protobuf wire format, as much of it as TensorBundle's few messages need.

Why by hand and not the ``protobuf`` package: that needs generated classes (or descriptors
built at run time) for five small messages, and it would be a heavy dependency for what is
here ~100 lines. This decoder reads one message level at a time: the caller decodes a
nested message by calling :func:`fields` again on its bytes, so the depth is fixed by the
schema (BundleEntryProto -> TensorShapeProto -> Dim), never by the input.

Everything is bounded: a varint is at most 10 bytes, a length never runs past the buffer,
a message of ``n`` bytes yields at most ``n`` fields, and every problem is a
``CheckpointFormatError`` naming ``where`` in the checkpoint it happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from cloudckpt.errors import CheckpointFormatError

VARINT = 0
FIXED64 = 1
LENGTH = 2
FIXED32 = 5

_MAX_VARINT_BYTES = 10
_UINT64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message: its number, wire type and value (an int, or bytes for ``LENGTH``)."""

    number: int
    wire_type: int
    value: int | bytes


def read_varint(data: bytes, pos: int, where: str) -> tuple[int, int]:
    """``(value, position after it)`` of the base-128 varint at ``pos`` (at most 10 bytes, < 2**64)."""
    result = 0
    shift = 0
    end = min(len(data), pos + _MAX_VARINT_BYTES)
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _UINT64:
                raise CheckpointFormatError(f"{where}: varint overflows 64 bits")
            return result, pos
        shift += 7
    if pos >= len(data):
        raise CheckpointFormatError(f"{where}: truncated varint")
    raise CheckpointFormatError(f"{where}: varint longer than {_MAX_VARINT_BYTES} bytes")


def fields(data: bytes, where: str) -> Iterator[Field]:
    """The fields of one serialized message, in order; unknown wire types are an error.

    Groups (wire types 3 and 4) are refused: no TensorBundle message has them.
    """
    pos = 0
    size = len(data)
    while pos < size:
        key, pos = read_varint(data, pos, where)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise CheckpointFormatError(f"{where}: field number 0")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = read_varint(data, pos, where)
        elif wire_type == FIXED64:
            if pos + 8 > size:
                raise CheckpointFormatError(f"{where}: truncated fixed64 field {number}")
            value = int.from_bytes(data[pos:pos + 8], "little")
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > size:
                raise CheckpointFormatError(f"{where}: truncated fixed32 field {number}")
            value = int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
        elif wire_type == LENGTH:
            length, pos = read_varint(data, pos, where)
            if length > size - pos:
                raise CheckpointFormatError(f"{where}: field {number} claims {length} bytes, "
                                            f"only {size - pos} remain")
            value = data[pos:pos + length]
            pos += length
        else:
            raise CheckpointFormatError(f"{where}: unsupported wire type {wire_type} (field {number})")
        yield Field(number, wire_type, value)


def as_int(field: Field, where: str, *, signed: bool = True, bits: int = 64) -> int:
    """A varint field as a (two's complement) ``int32``/``int64``/``uint*``; range-checked."""
    if field.wire_type != VARINT or not isinstance(field.value, int):
        raise CheckpointFormatError(f"{where}: field {field.number} should be a varint")
    value = field.value
    if signed:
        value &= _UINT64
        if value >= 1 << 63:
            value -= 1 << 64
        if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
            raise CheckpointFormatError(f"{where}: field {field.number} = {value} does not fit int{bits}")
    elif value >= 1 << bits:
        raise CheckpointFormatError(f"{where}: field {field.number} = {value} does not fit uint{bits}")
    return value


def as_fixed32(field: Field, where: str) -> int:
    if field.wire_type != FIXED32 or not isinstance(field.value, int):
        raise CheckpointFormatError(f"{where}: field {field.number} should be a fixed32")
    return field.value


def as_bytes(field: Field, where: str) -> bytes:
    if field.wire_type != LENGTH or not isinstance(field.value, bytes):
        raise CheckpointFormatError(f"{where}: field {field.number} should be length-delimited")
    return field.value


def as_text(field: Field, where: str) -> str:
    """A ``string`` field (UTF-8, as protobuf requires)."""
    try:
        return as_bytes(field, where).decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointFormatError(f"{where}: field {field.number} is not UTF-8 text") from None
