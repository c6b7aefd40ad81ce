"""The contract every storage backend passes (zarr-python's ``StoreTests`` pattern).

Subclass ``StorageContract`` in a test module and provide a ``store`` fixture that
yields a fresh, empty ``Storage`` built with ``CONTRACT_CONFIG`` (small parts, so the
multipart path runs on small data). Shipped in the package so third-party backends
can prove themselves with the same tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from cloudckpt.errors import (
    AlreadyExistsError,
    InvalidKeyError,
    InvalidRangeError,
    NotFoundError,
    PreconditionError,
)
from cloudckpt.storage import ByteRange, ReadRequest, Storage, TransferConfig, UpdateVersion
from cloudckpt.storage.retry import RetryPolicy

MiB = 1024 * 1024

#: Parts of 5 MiB (S3's minimum) above 6 MiB, reads split at 3 MiB.
CONTRACT_CONFIG = TransferConfig(
    multipart_threshold=6 * MiB,
    part_size=5 * MiB,
    max_concurrency=4,
    read_chunk_size=3 * MiB,
    retry=RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.2, deadline=10),
)

MULTIPART_SIZE = 13 * MiB  # three parts: 5 + 5 + 3


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


class StorageContract:
    """Behaviour every backend shares. ``store`` is a fixture provided by the subclass.

    A backend without conditional writes (plain fsspec) overrides the conditional tests
    to assert ``NotSupportedError`` instead.
    """

    # ---------------------------------------------------------------- round trips
    @pytest.mark.parametrize("size", [0, 1, 1000, MULTIPART_SIZE], ids=["empty", "one", "small", "multipart"])
    def test_round_trip(self, store: Storage, size: int) -> None:
        data = payload(size)
        meta = store.put("obj/blob", data)
        assert meta.key == "obj/blob"
        assert meta.size == size
        assert store.get("obj/blob") == data
        assert store.head("obj/blob").size == size

    @pytest.mark.parametrize("key", ["with space/a b.bin", "unicodé/ключ/数据.bin", "a+b=c&d/e;f,g"])
    def test_awkward_keys(self, store: Storage, key: str) -> None:
        store.put(key, b"payload")
        assert store.get(key) == b"payload"
        assert [m.key for m in store.list(key.split("/")[0] + "/")] == [key]

    def test_put_list_of_buffers_concatenates(self, store: Storage) -> None:
        arr = np.arange(1000, dtype=np.float32)
        store.put("concat", [b"head", arr, memoryview(b"tail")])
        assert store.get("concat") == b"head" + arr.tobytes() + b"tail"

    def test_multipart_from_many_buffers(self, store: Storage) -> None:
        chunks = [payload(3 * MiB + 17, seed=i) for i in range(5)]
        store.put("big", chunks)
        assert store.get("big") == b"".join(chunks)

    @pytest.mark.parametrize("size", [1000, MULTIPART_SIZE], ids=["small", "multipart"])
    def test_put_stream_reads_parts_and_consumes_them_in_order(self, store: Storage, size: int) -> None:
        data = payload(size, seed=3)
        reads: list[tuple[int, int]] = []
        seen: list[tuple[int, bytes]] = []

        def read(start: int, end: int) -> bytes:
            reads.append((start, end))
            return data[start:end]

        meta = store.put_stream("streamed", size, read, consume=lambda start, part: seen.append((start, bytes(part))))
        assert meta.size == size and store.get("streamed") == data
        assert [start for start, _ in seen] == sorted(start for start, _ in reads)  # in order, every part once
        assert b"".join(part for _, part in seen) == data
        streamed = size > CONTRACT_CONFIG.multipart_threshold and store.supports_multipart
        assert len(reads) == (3 if streamed else 1)  # 5 + 5 + 3 MiB parts, or one whole read

    def test_put_stream_refuses_a_short_part_and_leaves_nothing(self, store: Storage) -> None:
        data = payload(MULTIPART_SIZE)
        with pytest.raises(ValueError, match="expected"):
            store.put_stream("short", MULTIPART_SIZE, lambda start, end: data[start:end - (end == MULTIPART_SIZE)])
        assert not store.exists("short")

    def test_overwrite_replaces(self, store: Storage) -> None:
        store.put("k", b"one")
        store.put("k", b"two!")
        assert store.get("k") == b"two!"
        assert store.head("k").size == 4

    def test_user_metadata_round_trips(self, store: Storage) -> None:
        store.put("m", b"x", metadata={"purpose": "test"})
        assert store.head("m").metadata.get("purpose") == "test"

    # ---------------------------------------------------------------- ranges
    def test_every_range_kind(self, store: Storage) -> None:
        data = payload(10_000)
        store.put("r", data)
        assert store.get("r", ByteRange.bounded(10, 20)) == data[10:20]
        assert store.get("r", ByteRange.bounded(0, 10_000)) == data
        assert store.get("r", ByteRange.from_offset(9_990)) == data[9_990:]
        assert store.get("r", ByteRange.suffix(7)) == data[-7:]
        assert store.get("r", ByteRange.bounded(5, 5)) == b""

    def test_bad_ranges_are_clear_errors(self, store: Storage) -> None:
        store.put("r", b"0123456789")
        with pytest.raises(InvalidRangeError, match="r"):
            store.get("r", ByteRange.bounded(-1, 3))
        with pytest.raises(InvalidRangeError, match="inverted"):
            store.get("r", ByteRange.bounded(5, 2))
        with pytest.raises(InvalidRangeError):
            store.get("r", ByteRange.bounded(5, 50))
        with pytest.raises(InvalidRangeError):
            store.get("r", ByteRange.from_offset(50))

    def test_read_into_and_get_ranges(self, store: Storage) -> None:
        data = payload(MULTIPART_SIZE, seed=3)
        store.put("ranged", data)
        out = np.zeros(7 * MiB + 5, dtype=np.uint8)
        small = bytearray(100)
        store.read_into([ReadRequest("ranged", 1234, out.data),
                         ReadRequest("ranged", 42, memoryview(small))])
        assert out.tobytes() == data[1234:1234 + out.nbytes]
        assert bytes(small) == data[42:142]
        assert store.get_ranges("ranged", [(0, 3), (100, 200), (MULTIPART_SIZE - 5, MULTIPART_SIZE)]) == [
            data[0:3], data[100:200], data[-5:]]

    def test_read_into_adjacent_and_overlapping_requests(self, store: Storage) -> None:
        """Adjacent requests are read together, cut into spans anywhere; overlapping ones get their own bytes."""
        data = payload(MULTIPART_SIZE, seed=6)
        store.put("runs", data)
        bounds = [(0, 1), (1, 10), (10, 4 * MiB + 3), (4 * MiB + 3, 4 * MiB + 9),  # one run, cut at 3 MiB
                  (5, 15), (5, 15), (7 * MiB, 13 * MiB), (13 * MiB - 2, 13 * MiB)]  # overlaps and the end
        outs = [np.full(end - start, 0xEE, dtype=np.uint8) for start, end in bounds]
        store.read_into([ReadRequest("runs", start, out.data) for (start, _), out in zip(bounds, outs, strict=True)])
        for (start, end), out in zip(bounds, outs, strict=True):
            assert out.tobytes() == data[start:end], (start, end)

    def test_read_into_runs_done_once_after_the_bytes_landed(self, store: Storage) -> None:
        data = payload(MULTIPART_SIZE, seed=4)
        store.put("landed", data)
        seen: list[tuple[str, bytes]] = []
        lock = threading.Lock()
        out = np.zeros(10 * MiB, dtype=np.uint8)  # four ranged reads at CONTRACT_CONFIG's 3 MiB
        small = bytearray(7)

        def done(name: str, buffer: memoryview) -> Callable[[], None]:
            def run() -> None:
                with lock:
                    seen.append((name, bytes(buffer)))
            return run

        store.read_into([ReadRequest("landed", 100, out.data, done("split", out.data)),
                         ReadRequest("landed", 5, memoryview(small), done("small", memoryview(small))),
                         ReadRequest("landed", 0, memoryview(bytearray(3)))])
        assert sorted(seen) == [("small", data[5:12]), ("split", data[100:100 + out.nbytes])]

    def test_read_into_fails_with_what_done_raised(self, store: Storage) -> None:
        store.put("refused", payload(4 * MiB, seed=5))

        def refuse() -> None:
            raise ValueError("bytes refused")

        with pytest.raises(ValueError, match="bytes refused"):
            store.read_into([ReadRequest("refused", 0, memoryview(bytearray(4 * MiB)), refuse)])

    def test_read_into_past_end_fails(self, store: Storage) -> None:
        store.put("short", b"abc")
        with pytest.raises(InvalidRangeError):
            store.read_into([ReadRequest("short", 0, memoryview(bytearray(10)))])

    # ---------------------------------------------------------------- missing
    def test_missing_key(self, store: Storage) -> None:
        with pytest.raises(NotFoundError, match="nope"):
            store.get("nope")
        with pytest.raises(FileNotFoundError):
            store.head("nope")
        with pytest.raises(NotFoundError):
            store.get("nope", ByteRange.bounded(0, 1))
        assert store.exists("nope") is False

    def test_delete_one_many_and_missing(self, store: Storage) -> None:
        for key in ("d/1", "d/2", "d/3"):
            store.put(key, b"x")
        store.delete("d/1")
        store.delete(["d/2", "d/3", "d/never-existed"])
        store.delete("never")
        store.delete([])
        assert store.list("d/") == []

    # ---------------------------------------------------------------- listing
    def test_listing_prefix_edge_cases(self, store: Storage) -> None:
        for key in ("foo/x", "foo/sub/y", "foo.bar/y", "foobar", "fo"):
            store.put(key, b"1")
        assert [m.key for m in store.list("foo/")] == ["foo/sub/y", "foo/x"]
        assert [m.key for m in store.list("foo")] == ["foo.bar/y", "foo/sub/y", "foo/x", "foobar"]
        assert [m.key for m in store.list("")] == ["fo", "foo.bar/y", "foo/sub/y", "foo/x", "foobar"]
        assert store.list("nothing-here/") == []
        sizes = {m.key: m.size for m in store.list("foo/")}
        assert sizes == {"foo/x": 1, "foo/sub/y": 1}

    def test_unicode_listing(self, store: Storage) -> None:
        store.put("ü/数据-1", b"a")
        store.put("ü/数据-2", b"b")
        assert [m.key for m in store.list("ü/")] == ["ü/数据-1", "ü/数据-2"]

    # ---------------------------------------------------------------- keys
    @pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "./a"])
    def test_invalid_keys(self, store: Storage, key: str) -> None:
        with pytest.raises(InvalidKeyError):
            store.put(key, b"x")
        with pytest.raises(InvalidKeyError):
            store.get(key)

    # ---------------------------------------------------------------- conditional writes
    def test_create_twice(self, store: Storage) -> None:
        store.put("once", b"first", mode="create")
        with pytest.raises(AlreadyExistsError, match="once"):
            store.put("once", b"second", mode="create")
        assert store.get("once") == b"first"

    def test_create_multipart_twice(self, store: Storage) -> None:
        data = payload(MULTIPART_SIZE, seed=5)
        store.put("once-big", data, mode="create")
        with pytest.raises(AlreadyExistsError):
            store.put("once-big", payload(MULTIPART_SIZE, seed=6), mode="create")
        assert store.get("once-big") == data

    def test_update_version(self, store: Storage) -> None:
        first = store.put("v", b"1")
        assert first.version
        second = store.put("v", b"2", mode=UpdateVersion(first.version))
        assert second.version != first.version
        with pytest.raises(PreconditionError, match="v"):
            store.put("v", b"3", mode=UpdateVersion(first.version))
        assert store.get("v") == b"2"
        assert store.head("v").version == second.version

    def test_update_version_of_missing_key(self, store: Storage) -> None:
        with pytest.raises((PreconditionError, NotFoundError)):
            store.put("absent", b"x", mode=UpdateVersion("1"))
        assert not store.exists("absent")

    def test_compare_and_swap_race_loses_no_increment(self, store: Storage) -> None:
        store.put("counter", b"0")
        threads, increments = 8, 5
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(increments):
                    _cas_increment(store, "counter")
            except BaseException as exc:
                errors.append(exc)

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=120)
        assert not errors, errors
        assert int(store.get("counter")) == threads * increments


def _cas_increment(store: Storage, key: str, attempts: int = 500) -> None:
    """Read-modify-write with UpdateVersion, retrying when another writer won."""
    for _ in range(attempts):
        meta = store.head(key)
        value = int(store.get(key))
        try:
            store.put(key, str(value + 1).encode(), mode=UpdateVersion(meta.version or ""))
            return
        except PreconditionError:
            continue
    raise AssertionError(f"no CAS success in {attempts} attempts")


StoreFactory = Callable[[TransferConfig], Storage]
