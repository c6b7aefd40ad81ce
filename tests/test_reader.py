"""The restore read path: every byte verified, wherever and however it was read.

Chunks are verified on the pool as their reads land (``ReadRequest.done``); these tests
pin down that no way of reading skips a check: a chunk split over several ranged reads,
small chunks merged into one read, and a range reader that fills the requests itself
without running ``done`` (as the distributed relay does on the hosts it serves).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from cloudckpt import Checkpoint
from cloudckpt.errors import ChecksumError
from cloudckpt.format import ArrayEntry
from cloudckpt.format.index_fetch import load_index
from cloudckpt.restoring.array_reads import RangeReader, read_arrays, read_coalesced
from cloudckpt.restoring.buffers import ReadTarget
from cloudckpt.storage import ByteRange, ReadRequest, Storage, TransferConfig
from cloudckpt.storage.checksum import Crc32c, crc32c_of
from cloudckpt.storage.local import LocalStorage

MiB = 1024 * 1024


def sample_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"big": rng.standard_normal((3 * MiB // 4 // 64, 64)).astype(np.float32),  # 3 MiB
            "small_a": rng.standard_normal(100).astype(np.float32),
            "small_b": np.arange(40, dtype=np.int64),
            "small_c": rng.standard_normal((8, 8)).astype(np.float64)}


class FillWithoutDone:
    """A range reader that copies the bytes in itself and never runs ``done`` (like the relay)."""

    def __init__(self) -> None:
        self.requests = 0

    def read(self, storage: Storage, requests: Sequence[ReadRequest]) -> None:
        for req in requests:
            self.requests += 1
            req.out[:] = storage.get(req.key, ByteRange.bounded(req.offset, req.offset + req.out.nbytes))


def restore(root: Path, ranges: RangeReader | None = None) -> dict[str, np.ndarray]:
    """``read_arrays`` of the checkpoint at ``root/c``, 1 MiB ranged reads: the big chunk takes three."""
    storage = LocalStorage(root, config=TransferConfig(read_chunk_size=MiB))
    index = load_index(storage, "c")
    dest: dict[str, np.ndarray] = {}
    targets = []
    for key, entry in index.entries.items():
        if isinstance(entry, ArrayEntry):
            dest[key] = np.zeros(entry.shape, dtype=entry.dtype)
            targets.append(ReadTarget(key, entry, dest[key], live=False))
    read_arrays(storage, index, targets, ranges)
    return dest


def flip_byte_of(root: Path, key: str, at: int) -> None:
    """Flip one bit of ``key``'s stored bytes, ``at`` bytes into its chunk (negative: from its end)."""
    index = load_index(LocalStorage(root), "c")
    entry = index.entries[key]
    assert isinstance(entry, ArrayEntry)
    chunk = entry.chunks[0]
    data_file = root / index.objects[chunk.object].name
    raw = bytearray(data_file.read_bytes())
    raw[chunk.offset + (at % chunk.length)] ^= 0x10
    data_file.write_bytes(bytes(raw))


@pytest.mark.parametrize("reader", ["pool", "range reader without done"])
def test_restore_reads_every_array_whole(tmp_path: Path, reader: str) -> None:
    state = sample_state()
    Checkpoint(**state).write(tmp_path / "c")
    ranges = FillWithoutDone() if reader != "pool" else None
    restored = restore(tmp_path, ranges)
    assert set(state) <= set(restored)  # and the checkpoint's own save_counter
    for key, value in state.items():
        np.testing.assert_array_equal(restored[key], value)
    if ranges is not None:
        assert ranges.requests >= 2  # the big chunk and (merged or not) the small ones went through it


@pytest.mark.parametrize("reader", ["pool", "range reader without done"])
@pytest.mark.parametrize(("key", "at"), [("big", 5), ("big", -3), ("small_a", 17), ("small_b", -1),
                                         ("small_c", 0)])
def test_a_flipped_byte_anywhere_is_detected(tmp_path: Path, reader: str, key: str, at: int) -> None:
    Checkpoint(**sample_state()).write(tmp_path / "c")
    flip_byte_of(tmp_path, key, at)
    with pytest.raises(ChecksumError, match=rf"'{key}'") as info:
        restore(tmp_path, FillWithoutDone() if reader != "pool" else None)
    assert info.value.key == key


def test_reads_are_verified_on_the_pool_as_they_land(tmp_path: Path) -> None:
    """``read_coalesced`` runs every request's ``done`` (merged small ones too) before it returns."""
    Checkpoint(**sample_state()).write(tmp_path / "c")
    seen: list[ReadRequest] = []

    class Coalesced:
        def read(self, storage: Storage, requests: Sequence[ReadRequest]) -> None:
            read_coalesced(storage, requests)
            seen.extend(requests)
            assert all(getattr(r.done, "ran", False) for r in requests)

    restore(tmp_path, Coalesced())
    assert len(seen) == 5  # four arrays and the save counter, of which four are small and merged


def test_crc32c_reads_any_contiguous_buffer_in_place() -> None:
    values = np.random.default_rng(3).standard_normal((64, 33)).astype(np.float32)
    expected = crc32c_of([values.tobytes()])
    assert crc32c_of([values.data]) == expected  # a 2-D float view, no cast, no copy
    assert crc32c_of([memoryview(values.tobytes()[:100]), values.reshape(-1).view(np.uint8).data[100:]]) == expected
    running = Crc32c()
    for row in values:
        running.update(row.data)
    assert running.value == expected
    assert crc32c_of([b"123456789"]) == 0xE3069283  # the CRC-32C check value (RFC 3720)
