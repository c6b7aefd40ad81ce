"""Request-body checksums built from the CRC32Cs a save already computed (issue 27).

A save fingerprints every piece (CRC32C of it and of each 1 MiB block) for the index; S3 and
GCS also want the CRC32C of every request body. ``ChecksummedViews`` carries the known
values down to the backend, which combines them and reads only the bytes no known range
covers. These tests pin that the combined value is the true CRC32C for any cut of the
bytes, that known ranges really are not read again, and that a save hashes each byte once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import servers
from conftest import unique_name

import cloudckpt
from cloudckpt.storage import TransferConfig, register_storage, unregister_storage
from cloudckpt.storage import checksum as checksum_module
from cloudckpt.storage.checksum import CRC_BLOCK, KnownCrc, crc32c_of, crc32c_of_range, crc32c_with_blocks
from cloudckpt.storage.s3 import S3Storage
from cloudckpt.storage.transfer import ChecksummedViews, body_crc32c, slice_pieces

MiB = 1024 * 1024


def _object(rng: random.Random, block: int) -> tuple[bytes, list[KnownCrc]]:
    """Random bytes with known CRCs for some ranges (gaps between them, some with blocks)."""
    data = bytearray()
    known: list[KnownCrc] = []
    for _ in range(rng.randint(1, 6)):
        data += rng.randbytes(rng.choice([0, 1, 7, block - 1]))  # padding nobody knows
        piece = rng.randbytes(rng.choice([1, 5, block, block + 3, 3 * block + 11]))
        crc, blocks = crc32c_with_blocks(memoryview(piece), block)
        known.append(KnownCrc(len(data), len(piece), crc, block if blocks else 0, blocks))
        data += piece
    data += rng.randbytes(rng.choice([0, 9]))
    return bytes(data), known


@pytest.mark.parametrize("seed", range(40))
def test_a_body_checksum_from_known_ranges_equals_reading_every_byte(seed: int) -> None:
    """Any cut of the object, split into any views: the combined CRC is the true one."""
    rng = random.Random(seed)
    block = 64
    data, known = _object(rng, block)
    start = rng.randrange(len(data))
    end = rng.randint(start + 1, len(data))
    whole = memoryview(data)
    cuts = sorted(rng.sample(range(start + 1, end), min(3, end - start - 1))) if end - start > 1 else []
    views = [whole[a:b] for a, b in zip([start, *cuts], [*cuts, end], strict=True)]
    assert crc32c_of_range(known, start, views) == crc32c_of([whole[start:end]])
    body = ChecksummedViews([whole], known)
    assert body_crc32c(slice_pieces(body, start, end)) == crc32c_of([whole[start:end]])


def test_known_ranges_are_combined_not_read() -> None:
    """A known value is trusted for its bytes: stating another content's CRC changes the result
    exactly as if those bytes were that content, while the cut edges are read."""
    rng = random.Random(7)
    block = 64
    piece, other = rng.randbytes(5 * block), rng.randbytes(5 * block)
    padding = rng.randbytes(10)
    data = padding + piece
    crc, blocks = crc32c_with_blocks(memoryview(other), block)  # what ``other`` is, said of ``piece``
    known = [KnownCrc(len(padding), len(piece), crc, block, blocks)]
    as_if = padding + other
    assert crc32c_of_range(known, 0, [memoryview(data)]) == crc32c_of([memoryview(as_if)])
    # A part from inside the padding to inside the piece's fourth block: the three whole blocks
    # come from ``other``; the padding and the cut block are read.
    start, end = 3, len(padding) + 3 * block + 5
    mixed = data[start:len(padding)] + other[:3 * block] + data[len(padding) + 3 * block:end]
    assert crc32c_of_range(known, start, [memoryview(data)[start:end]]) == crc32c_of([memoryview(mixed)])


def test_plain_views_are_hashed_as_before() -> None:
    data = memoryview(b"abcdef" * 100)
    assert body_crc32c([data[:7], data[7:]]) == crc32c_of([data])


@pytest.fixture()
def counted_crc(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bytes that went through the CRC32C routine (every checksum in the library calls it)."""
    hashed = [0]
    real = checksum_module._crc32c

    def counting(buf: object, value: int = 0) -> int:
        hashed[0] += memoryview(buf).nbytes  # type: ignore[arg-type]
        return real(buf, value)  # type: ignore[arg-type]

    monkeypatch.setattr(checksum_module, "_crc32c", counting)
    yield hashed


@pytest.mark.s3
@pytest.mark.parametrize("multipart", [False, True], ids=["one-put", "parts"])
def test_a_save_to_s3_hashes_each_byte_once(seaweedfs: servers.Server, counted_crc: list[int],
                                           multipart: bool) -> None:
    """The index's CRCs and S3's ``ChecksumCRC32C`` headers from one pass (SeaweedFS verifies
    every header: a wrong combined value fails the save), and the checkpoint reads back."""
    bucket = unique_name("bodycrc")
    servers.create_bucket(seaweedfs.endpoint, bucket)
    config = TransferConfig(multipart_threshold=5 * MiB if multipart else 64 * MiB, part_size=5 * MiB)
    store = S3Storage(f"s3://{bucket}/run", endpoint_url=seaweedfs.endpoint, config=config)
    register_storage(store)
    try:
        rng = np.random.default_rng(3)
        # Odd sizes, so parts cut pieces and blocks in the middle.
        state = {f"w{i}": rng.standard_normal(n).astype(np.float32) for i, n in
                 enumerate([3 * CRC_BLOCK // 4 + 5, 5 * CRC_BLOCK // 4 + 1, 7, 2 * CRC_BLOCK + 3])}
        total = sum(a.nbytes for a in state.values())
        counted_crc[0] = 0
        cloudckpt.Checkpoint(state=state).write(f"s3://{bucket}/run/ckpt")
        assert total <= counted_crc[0] < 1.2 * total + 64 * 1024  # the fingerprint pass, part edges, the index
        dest = {k: np.zeros_like(v) for k, v in state.items()}
        cloudckpt.Checkpoint(state=dest).read(f"s3://{bucket}/run/ckpt").assert_consumed()
        assert all(np.array_equal(dest[k], state[k]) for k in state)
    finally:
        unregister_storage(store)
        store.close()
