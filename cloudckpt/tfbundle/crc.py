"""TensorFlow's masked CRC32C (``tsl/lib/hash/crc32c.h``).

Why masked: TensorFlow stores CRCs next to the data they cover, and a CRC of bytes that
themselves contain CRCs is weak; it rotates the CRC and adds a constant before storing it.
"""

from __future__ import annotations

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def mask(crc: int) -> int:
    """The stored form of a CRC32C."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """The CRC32C a stored (masked) value stands for."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32
