"""``tf.string`` tensors in a data shard (``WriteStringTensor`` / ``ReadStringTensor``).

On disk, for ``n`` elements::

    varint64 length[0] ... varint64 length[n-1]
    fixed32  masked CRC32C of the lengths, each as a 4-byte integer (8-byte if > 2**32 - 1)
    bytes[0] ... bytes[n-1]

The entry's CRC32C covers the lengths in that fixed-width form (not their varint bytes),
then the 4 stored bytes of the length checksum, then the string bytes. Fixed-width
integers are in the writer's byte order (the bundle header's endianness).

TensorFlow's reader trusts the entry's size loosely; this one requires the pieces to add up
to exactly ``size`` bytes, so a hostile entry cannot make it read past its own bytes. Bytes
that do not parse are damaged bytes (the index already said how many there are), so every
problem here is a ``ChecksumError`` naming the tensor.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import CheckpointFormatError, ChecksumError
from cloudckpt.storage.checksum import Crc32c
from cloudckpt.tfbundle.crc import unmask
from cloudckpt.tfbundle.wire import read_varint

_U32_MAX = (1 << 32) - 1


def decode_strings(data: bytes, count: int, *, big_endian: bool, url: str, key: str) -> tuple[NDArray[np.object_], int]:
    """``(flat object array of bytes, CRC32C as TensorFlow computes it)`` of one string tensor.

    ``url`` is the data shard, ``key`` the tensor's name (for the error).

    Raises:
        ChecksumError: the lengths, their checksum or the total size do not fit.
    """
    where = f"string tensor {key!r} in {url}"

    def damaged(problem: str) -> ChecksumError:
        return ChecksumError(f"{where}: {problem}", url, key=key)

    if count == 0 and not data:
        return np.empty(0, dtype=object), 0  # TensorFlow reads a 0-byte entry as no strings
    order: Literal["big", "little"] = "big" if big_endian else "little"
    lengths: list[int] = []
    crc = Crc32c()
    pos = 0
    size = len(data)
    budget = size
    for _ in range(count):
        try:
            length, pos = read_varint(data, pos, where)
        except CheckpointFormatError as exc:
            raise damaged(f"bad string length ({exc})") from None
        if length > budget:
            raise damaged(f"a string of {length} bytes in a {size}-byte entry")
        budget -= length
        lengths.append(length)
        crc.update(length.to_bytes(4 if length <= _U32_MAX else 8, order))
    if pos + 4 > size:
        raise damaged(f"the string lengths run past the entry's {size} bytes")
    stored = data[pos:pos + 4]
    if unmask(int.from_bytes(stored, order)) != crc.value:
        raise damaged("the checksum of the string lengths does not match")
    crc.update(stored)
    pos += 4
    if pos + sum(lengths) != size:
        raise damaged(f"{count} strings of {sum(lengths)} bytes do not fill the entry's {size} bytes")
    out = np.empty(count, dtype=object)
    crc.update(memoryview(data)[pos:])
    for i, length in enumerate(lengths):
        out[i] = data[pos:pos + length]
        pos += length
    return out, crc.value
