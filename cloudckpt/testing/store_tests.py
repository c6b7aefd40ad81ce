"""The contract every storage backend passes (zarr-python's ``StoreTests`` pattern).

Subclass ``StorageContract`` in a test module and provide:

* a ``store`` fixture that yields a fresh, empty ``Storage`` built with
  ``CONTRACT_CONFIG`` (small parts, so the multipart path runs on small data);
* the raw-access hooks ``raw_put`` / ``raw_get`` / ``raw_keys``, which reach the objects
  *behind the store's back* (an admin client, the file system): they prove that what a
  store writes is where it says, and that it sees what others wrote (zarr's abstract
  ``set`` / ``get`` helpers play this part in its ``StoreTests``);
* a ``faulty`` fixture: a fresh store and the ``Faults`` (``cloudckpt.testing.faults``)
  that inject failures into its requests - ``PrimitiveFaults`` for stores without a
  network, an HTTP proxy or transport adapter for cloud stores;
* a ``missing_bucket_store`` fixture: a store whose bucket does not exist (stores without
  buckets: one whose root does not exist yet), and ``has_buckets``.

Then retries, the writer-nonce check of a retried conditional write, the retry budget,
a missing bucket and ``server_time`` are tested the same way on every backend. Shipped
in the package so third-party backends can prove themselves with the same tests.

Why one ~640-line module: it is one test class, the contract, read as a list of
promises every backend keeps; splitting it would make a backend author hunt for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import ClassVar

import numpy as np
import pytest

from cloudckpt.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    InvalidKeyError,
    InvalidRangeError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    TransferCancelledError,
    TransientError,
)
from cloudckpt.storage import ByteRange, ReadRequest, Storage, TransferConfig, UpdateVersion, WriteMode
from cloudckpt.storage.base import PROBE_PREFIX
from cloudckpt.storage.retry import RetryPolicy
from cloudckpt.testing.faults import Faults, Verb

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
#: How far a store's clock may be from this machine's for the server_time test (same host here).
CLOCK_TOLERANCE = timedelta(minutes=5)


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def without_probes(keys: list[str]) -> list[str]:
    """Raw keys minus capability-probe scratch objects (a background probe may be mid-flight)."""
    return [key for key in keys if not key.startswith(PROBE_PREFIX)]


class StorageContract:
    """Behaviour every backend shares; the subclass provides the fixtures and hooks below.

    A backend without conditional writes (``supports_conditional_writes = False``, plain
    fsspec) must refuse each conditional write with ``NotSupportedError`` and write
    nothing; the conditional tests check exactly that for it.
    """

    #: Whether the store's URL names a bucket (S3, GCS): a missing one fails every verb.
    has_buckets: ClassVar[bool] = False
    #: SeaweedFS creates a missing bucket on the first authenticated write (writes succeed).
    creates_missing_bucket_on_write: ClassVar[bool] = False
    #: Whether the store can answer "slow down" (S3 503 SlowDown, GCS 429): ``faults.throttle`` works.
    throttles: ClassVar[bool] = False

    # ---------------------------------------------------------------- hooks
    @pytest.fixture
    def store(self) -> Iterator[Storage]:
        """A fresh, empty store built with ``CONTRACT_CONFIG``."""
        raise NotImplementedError
        yield  # pragma: no cover

    @pytest.fixture
    def faulty(self) -> Iterator[tuple[Storage, Faults]]:
        """A fresh, empty store (``CONTRACT_CONFIG``) whose requests go through ``Faults``."""
        raise NotImplementedError
        yield  # pragma: no cover

    @pytest.fixture
    def missing_bucket_store(self) -> Iterator[Storage]:
        """A store on a bucket that does not exist (without buckets: on a root not created yet)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def raw_put(self, store: Storage, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` of ``store``'s root without going through ``store``."""
        raise NotImplementedError

    def raw_get(self, store: Storage, key: str) -> bytes | None:
        """The bytes at ``key`` of ``store``'s root, read without ``store``; ``None`` if absent."""
        raise NotImplementedError

    def raw_keys(self, store: Storage) -> list[str]:
        """Everything under ``store``'s root as the backend holds it, sorted, relative to the root.

        Temporaries and incomplete uploads included (S3: an incomplete multipart upload
        of ``k`` shows as ``"k (incomplete upload)"``): what a failed write left behind.
        """
        raise NotImplementedError

    def leftovers(self, store: Storage) -> list[str]:
        return without_probes(self.raw_keys(store))

    # ---------------------------------------------------------------- round trips
    @pytest.mark.parametrize("size", [0, 1, 1000, MULTIPART_SIZE], ids=["empty", "one", "small", "multipart"])
    def test_round_trip(self, store: Storage, size: int) -> None:
        data = payload(size)
        meta = store.put("obj/blob", data)
        assert meta.key == "obj/blob"
        assert meta.size == size
        assert store.get("obj/blob") == data
        assert store.head("obj/blob").size == size
        assert self.raw_get(store, "obj/blob") == data
        assert self.leftovers(store) == ["obj/blob"]  # no temporaries, no parts, no incomplete upload

    @pytest.mark.parametrize("key", ["with space/a b.bin", "unicodé/ключ/数据.bin", "a+b=c&d/e;f,g"])
    def test_awkward_keys(self, store: Storage, key: str) -> None:
        store.put(key, b"payload")
        assert store.get(key) == b"payload"
        assert [m.key for m in store.list(key.split("/")[0] + "/")] == [key]
        assert self.raw_get(store, key) == b"payload"

    # ---------------------------------------------------------------- behind the store's back
    def test_objects_written_by_others_are_seen(self, store: Storage) -> None:
        theirs = {"x/one": b"1", "x/two": payload(1000, seed=1), "x/sub/three": b""}
        for key, data in theirs.items():
            self.raw_put(store, key, data)
        for key, data in theirs.items():
            assert store.get(key) == data
            assert store.head(key).size == len(data)
            assert store.exists(key)
        assert [m.key for m in store.list("x/")] == sorted(theirs)
        assert store.get("x/two", ByteRange.bounded(10, 20)) == theirs["x/two"][10:20]

    def test_writes_land_at_their_keys(self, store: Storage) -> None:
        ours = {"a": b"1", "dir/b": payload(1000), "dir/sub/c": b"", "big": payload(MULTIPART_SIZE, seed=9)}
        for key, data in ours.items():
            store.put(key, data)
        assert {key: self.raw_get(store, key) for key in ours} == ours
        assert self.leftovers(store) == sorted(ours)

    def test_delete_removes_the_objects(self, store: Storage) -> None:
        for key in ("gone/1", "gone/2", "kept"):
            self.raw_put(store, key, b"x")
        store.delete("gone/1")
        store.delete(["gone/2", "gone/never-existed"])
        assert self.raw_get(store, "gone/1") is None and self.raw_get(store, "gone/2") is None
        assert self.leftovers(store) == ["kept"]

    @pytest.mark.parametrize("size", [10, MULTIPART_SIZE], ids=["put", "multipart"])
    def test_create_refuses_what_someone_else_wrote(self, store: Storage, size: int) -> None:
        self.raw_put(store, "taken", b"theirs")
        with pytest.raises(NotSupportedError if not store.supports_conditional_writes else AlreadyExistsError,
                           match="taken"):
            store.put("taken", payload(size), mode="create")
        assert self.raw_get(store, "taken") == b"theirs"
        assert self.leftovers(store) == ["taken"]

    def test_update_version_refuses_after_someone_else_wrote(self, store: Storage) -> None:
        seen = store.put("state", b"1").version or ""
        self.raw_put(store, "state", b"someone else's")
        with pytest.raises(NotSupportedError if not store.supports_conditional_writes else PreconditionError,
                           match="state"):
            store.put("state", b"2", mode=UpdateVersion(seen))
        assert self.raw_get(store, "state") == b"someone else's"

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
        if _refuses_conditional(store, "once", b"first", "create"):
            return
        store.put("once", b"first", mode="create")
        with pytest.raises(AlreadyExistsError, match="once"):
            store.put("once", b"second", mode="create")
        assert store.get("once") == b"first"

    def test_create_multipart_twice(self, store: Storage) -> None:
        data = payload(MULTIPART_SIZE, seed=5)
        if _refuses_conditional(store, "once-big", data, "create"):
            return
        store.put("once-big", data, mode="create")
        with pytest.raises(AlreadyExistsError):
            store.put("once-big", payload(MULTIPART_SIZE, seed=6), mode="create")
        assert store.get("once-big") == data

    def test_update_version(self, store: Storage) -> None:
        first = store.put("v", b"1")
        assert first.version or not store.supports_conditional_writes
        if _refuses_conditional(store, "v", b"2", UpdateVersion(first.version or "x")):
            assert store.get("v") == b"1"
            return
        second = store.put("v", b"2", mode=UpdateVersion(first.version or ""))
        assert second.version != first.version
        with pytest.raises(PreconditionError, match="v"):
            store.put("v", b"3", mode=UpdateVersion(first.version or ""))
        assert store.get("v") == b"2"
        assert store.head("v").version == second.version

    def test_update_version_of_missing_key(self, store: Storage) -> None:
        if _refuses_conditional(store, "absent", b"x", UpdateVersion("1")):
            return
        with pytest.raises((PreconditionError, NotFoundError)):
            store.put("absent", b"x", mode=UpdateVersion("1"))
        assert not store.exists("absent")

    def test_compare_and_swap_race_loses_no_increment(self, store: Storage) -> None:
        store.put("counter", b"0")
        if _refuses_conditional(store, "counter", b"1", UpdateVersion(store.head("counter").version or "0")):
            return
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

    # ---------------------------------------------------------------- cancellation
    def test_cancel_transfers_stops_a_write_in_flight_and_leaves_nothing(self, store: Storage) -> None:
        """What an interrupted save relies on (Ctrl-C): a cancelled write stops, aborts, commits nothing."""
        data = payload(MULTIPART_SIZE, seed=4)
        reads: list[int] = []

        def read(start: int, end: int) -> bytes:
            reads.append(start)
            if len(reads) == 2 or not store.supports_multipart:  # mid-way through the parts
                store.cancel_transfers()
            return data[start:end]

        with pytest.raises(TransferCancelledError, match="cancelled"):
            store.put_stream("cancelled", MULTIPART_SIZE, read)
        assert self.raw_get(store, "cancelled") is None
        assert self.leftovers(store) == []  # no parts, chunk objects, temporaries or incomplete upload
        store.put("after", data)  # a write started after the cancel runs normally
        assert self.raw_get(store, "after") == data

    # ---------------------------------------------------------------- faults: retries
    @pytest.mark.parametrize(("verb", "size"), [("put", 1000), ("part", MULTIPART_SIZE),
                                                ("complete", MULTIPART_SIZE)])
    def test_transient_write_failures_are_retried(self, faulty: tuple[Storage, Faults], verb: Verb,
                                                  size: int) -> None:
        store, faults = faulty
        if not store.supports_multipart:
            verb = "put"  # every write is one request
        data = payload(size, seed=2)
        faults.fail(verb, "obj", times=2)
        store.put("obj", data)
        assert faults.pending() == 0  # both faults fired...
        assert faults.attempts(verb, "obj") >= 3
        assert self.raw_get(store, "obj") == data  # ...and the object is whole
        assert self.leftovers(store) == ["obj"]

    @pytest.mark.parametrize("verb", ["get", "head", "list", "delete"])
    def test_transient_request_failures_are_retried(self, faulty: tuple[Storage, Faults], verb: Verb) -> None:
        store, faults = faulty
        data = payload(MULTIPART_SIZE, seed=3)
        self.raw_put(store, "obj", data)
        faults.fail(verb, "ob" if verb == "list" else "obj", times=2)
        if verb == "get":
            assert store.get("obj") == data
            out = bytearray(MULTIPART_SIZE - 10)
            faults.fail("get", "obj", times=1)
            store.read_into([ReadRequest("obj", 10, memoryview(out))])
            assert bytes(out) == data[10:]
        elif verb == "head":
            assert store.head("obj").size == MULTIPART_SIZE
        elif verb == "list":
            assert [m.key for m in store.list("ob")] == ["obj"]
        else:
            store.delete("obj")
            assert self.raw_get(store, "obj") is None
        assert faults.pending() == 0

    @pytest.mark.parametrize("verb", ["get", "put"])
    def test_retries_stop_at_the_budget_with_a_transient_error(self, faulty: tuple[Storage, Faults],
                                                               verb: Verb) -> None:
        store, faults = faulty
        if verb == "get":
            self.raw_put(store, "flaky", b"x")
        faults.fail(verb, "flaky", times=1000)
        with pytest.raises(TransientError, match="flaky") as info:
            store.get("flaky") if verb == "get" else store.put("flaky", b"mine")
        assert info.value.url == store.url_for("flaky")
        # Exactly the policy's attempts: no second retry layer (SDK retries) multiplies them.
        assert faults.attempts(verb, "flaky") == CONTRACT_CONFIG.retry.max_attempts
        if verb == "put":
            assert self.raw_get(store, "flaky") is None

    @pytest.mark.parametrize("size", [1000, MULTIPART_SIZE], ids=["put", "multipart"])
    def test_a_denied_write_leaves_nothing(self, faulty: tuple[Storage, Faults], size: int) -> None:
        store, faults = faulty
        verb: Verb = "part" if size > CONTRACT_CONFIG.multipart_threshold and store.supports_multipart else "put"
        faults.deny(verb, "denied")  # once: a retry would succeed, so the error proves there was none
        with pytest.raises(PermissionDeniedError, match="denied"):
            store.put("denied", payload(size))
        assert faults.pending() == 0
        assert self.leftovers(store) == []  # no object, no parts, no temporaries, no incomplete upload

    # ---------------------------------------------------------------- throttling is back-pressure
    def test_throttling_lowers_concurrency_and_recovers(self, faulty: tuple[Storage, Faults]) -> None:
        store, faults = faulty
        top = CONTRACT_CONFIG.max_concurrency
        self.raw_put(store, "hot", b"x")
        if not self.throttles:  # nothing here can ask for fewer requests: the limit never moves
            for _ in range(5):
                assert store.get("hot") == b"x"
            assert (store.transfer_stats().throttled, store.transfer_stats().concurrency) == (0, top)
            return
        throttles = CONTRACT_CONFIG.retry.max_attempts + 4  # beyond the transient budget: throttling has its own
        faults.throttle("get", "hot", times=throttles)
        assert store.get("hot") == b"x"
        assert faults.pending() == 0
        backed_off = store.transfer_stats()
        assert backed_off.throttled == throttles and backed_off.retries >= throttles
        assert backed_off.concurrency < top and backed_off.min_concurrency == 1  # fewer requests in flight
        for _ in range(8 * top):  # successes raise the limit again, about one per window of requests
            store.head("hot")
        recovered = store.transfer_stats()
        assert recovered.concurrency == top and recovered.throttled == throttles

    def test_throttling_ends_at_its_own_deadline(self, faulty: tuple[Storage, Faults]) -> None:
        store, faults = faulty
        if not self.throttles:
            assert store._is_throttle(TimeoutError("not throttling")) is False
            return
        # Long enough that a first request slowed by a loaded machine still leaves room for a retry.
        short = replace(CONTRACT_CONFIG, retry=replace(CONTRACT_CONFIG.retry, throttle_deadline=3.0))
        store.config = short  # the retry policy is read per request
        self.raw_put(store, "hot", b"x")
        faults.throttle("get", "hot", times=10_000)
        with pytest.raises(TransientError, match="hot"):
            store.get("hot")
        assert faults.attempts("get", "hot") >= 2  # retried while the deadline allowed, then gave up

    # ---------------------------------------------------------------- faults: the retry trap of conditional writes
    @pytest.mark.parametrize("size", [100, MULTIPART_SIZE], ids=["put", "multipart"])
    def test_lost_answer_to_a_create_is_not_a_conflict(self, faulty: tuple[Storage, Faults], size: int) -> None:
        """The write lands, its answer is lost, the retry is refused: the writer nonce says it was ours."""
        store, faults = faulty
        data = payload(size, seed=11)
        if _refuses_conditional(store, "once", data, "create"):
            return
        faults.lose_answer("commit", "once")
        meta = store.put("once", data, mode="create")
        assert faults.pending() == 0  # the fault really fired; the retry was refused (412, NoSuchUpload),
        # and only the writer nonce can tell that the refusal was our own first attempt - or the
        # retry found its first attempt's result (a local commit remembers it): either way, success.
        assert self.raw_get(store, "once") == data
        assert store.head("once").version == meta.version
        with pytest.raises(AlreadyExistsError):  # a real second create still fails
            store.put("once", b"other", mode="create")
        assert self.leftovers(store) == ["once"]

    def test_lost_answer_to_a_compare_and_swap_is_not_a_conflict(self, faulty: tuple[Storage, Faults]) -> None:
        store, faults = faulty
        first = store.put("state", b"1")
        if _refuses_conditional(store, "state", b"2", UpdateVersion(first.version or "x")):
            return
        faults.lose_answer("commit", "state")
        second = store.put("state", b"2", mode=UpdateVersion(first.version or ""))
        assert faults.pending() == 0
        assert self.raw_get(store, "state") == b"2"
        assert second.version == store.head("state").version

    def test_a_real_conflict_after_a_retry_is_still_reported(self, faulty: tuple[Storage, Faults]) -> None:
        store, faults = faulty
        self.raw_put(store, "taken", b"someone else's")
        if _refuses_conditional(store, "taken", b"mine", "create"):
            return
        faults.fail("commit", "taken")
        with pytest.raises(AlreadyExistsError, match="taken"):
            store.put("taken", b"mine", mode="create")
        assert faults.pending() == 0
        assert self.raw_get(store, "taken") == b"someone else's"

    # ---------------------------------------------------------------- missing bucket
    def test_a_missing_bucket_fails_every_verb(self, missing_bucket_store: Storage) -> None:
        store = missing_bucket_store
        reads: dict[str, Callable[[], object]] = {
            "get": lambda: store.get("k"), "head": lambda: store.head("k"), "exists": lambda: store.exists("k"),
            "ranged get": lambda: store.get("k", ByteRange.bounded(0, 1)),
            "read_into": lambda: store.read_into([ReadRequest("k", 0, memoryview(bytearray(4)))]),
            "list": lambda: store.list(), "delete": lambda: store.delete("k"),
            "delete many": lambda: store.delete(["a", "b"]),
        }
        writes: dict[str, Callable[[], object]] = {
            "put": lambda: store.put("k", b"x"), "multipart put": lambda: store.put("big", payload(MULTIPART_SIZE)),
            "create": lambda: store.put("c", b"x", mode="create"),
        }
        if not self.has_buckets:
            # No buckets: a missing root reads as empty - never as a missing *bucket* - and
            # the first write creates it.
            with pytest.raises(NotFoundError) as info:
                store.get("k")
            assert not isinstance(info.value, BucketNotFoundError)
            assert store.exists("k") is False and store.list() == []
            store.delete(["a", "b"])
            store.put("k", b"x")
            assert self.raw_get(store, "k") == b"x"
            return
        calls = dict(reads) if self.creates_missing_bucket_on_write else {**reads, **writes}
        for verb, call in calls.items():
            with pytest.raises(BucketNotFoundError) as info:
                call()
                pytest.fail(f"{verb} in a missing bucket did not raise")
            assert info.value.url is not None and info.value.url.startswith(store.url), verb

    # ---------------------------------------------------------------- clock
    def test_server_time_is_the_stores_clock(self, faulty: tuple[Storage, Faults]) -> None:
        store, faults = faulty
        skew = timedelta(hours=3)
        shifted = faults.skew_clock(skew)  # a store that reads its clock from its answers shows the shift
        stamp = store.server_time()
        assert stamp.tzinfo is not None
        expected = datetime.now(timezone.utc) + (skew if shifted else timedelta(0))
        assert abs(stamp - expected) < CLOCK_TOLERANCE


def _refuses_conditional(store: Storage, key: str, data: bytes, mode: WriteMode) -> bool:
    """On a store without conditional writes: check the refusal (and that nothing was written)."""
    if store.supports_conditional_writes:
        return False
    existed = store.exists(key)
    before = store.get(key) if existed else None
    with pytest.raises(NotSupportedError, match="conditional"):
        store.put(key, data, mode=mode)
    assert (store.get(key) if store.exists(key) else None) == before
    return True


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
