"""The strong content hash an incremental save compares: XXH3-128 of a piece's bytes.

Why not CRC32C: 32 bits is an integrity check, not an identity - across millions of
comparisons two different buffers will share a CRC. Reuse must be safe, so a piece's bytes
are reused only on an equal 128-bit hash *and* equal key, dtype, shape, box and length.
Why XXH3-128 over BLAKE3: measured here on one core over 512 MiB, 19 GB/s against 6 GB/s
(12 GB/s with BLAKE3's threads); both are far above any upload, but the hash runs on every
byte of every managed save, changed or not. It is not a cryptographic hash: it guards
against accidental equality, which is what reuse between one job's own saves needs (the
bytes compared are this process's own arrays and its own earlier checkpoint's record).
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

#: The algorithm's tag in the index (``Chunk.hash`` = ``"xxh3_128:<32 hex digits>"``).
ALGORITHM = "xxh3_128"


def content_hash(pieces: Iterable[memoryview]) -> str:
    """The tagged XXH3-128 digest of the concatenation of ``pieces`` (no copy)."""
    hasher = xxhash.xxh3_128()
    for piece in pieces:
        hasher.update(piece)
    return f"{ALGORITHM}:{hasher.hexdigest()}"
