"""An S3 front that throttles like S3 does: token buckets per key-prefix partition, ``503 SlowDown`` above them.

Why: S3 serves about 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per second
*per partitioned prefix*, and answers ``503 SlowDown`` above that. A checkpoint written by
hundreds of hosts at once meets that limit long before it meets bandwidth; SeaweedFS on
127.0.0.1 has no such limit, so the scaling benchmark puts this in front of it, with the
rates scaled down to what this machine serves (default 50 writes and 80 reads per second
per partition - the same 1 : 1.6 ratio as S3's).

Partitions: S3 splits a bucket's key space at prefixes where the load is; a checkpoint
directory whose keys share their first characters stays one partition however many
hosts write into it. The model here is a static snapshot of that: a key's partition is
its bucket, its checkpoint *directory* (the longest of the configured ``directories`` it
starts with) and the first ``chars`` characters after it. With ``chars`` just covering
``ckpt-7.data-``, every data object of today's layout (``ckpt-7.data-00003-of-00256.<suffix>``)
lands in one partition; a layout that puts a short hash right after the directory (or
after ``ckpt-7.d/``, with ``chars`` set to cover it) spreads them over many. Keys outside
every directory are partitioned by their first ``chars`` characters.

Each partition has two token buckets - writes (PUT/POST/DELETE) and reads (GET/HEAD) -
refilled at the configured rate, holding at most ``burst`` seconds' worth. A request that
finds its bucket empty is answered with S3's ``503 SlowDown`` error (the XML body S3 sends;
no body for HEAD, as S3 does) and never reaches the server. Every request is recorded as
a small event (time, partition, class, throttled, what kind of key, bytes) so a
benchmark can count requests, 503s, index GETs and requests per second per partition for
any window of time (``ThrottleProxy.summary``).

The transport is the test suite's ``FaultProxy`` (tests/faultproxy.py): loopback only,
every socket with a timeout, stopped by ``stop()``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import FaultProxy, Request, Rule  # the tests' transport

Klass = Literal["write", "read"]
KeyKind = Literal["index", "data", "other"]

#: S3's own words for it (the body of a real ``SlowDown``).
SLOW_DOWN = "Please reduce your request rate."


@dataclass(frozen=True, slots=True)
class PartitionRule:
    """Which partition a key belongs to (see the module docs).

    Attributes:
        directories: checkpoint directories, relative to the bucket, each ending in ``/``.
        chars: characters after the directory that still belong to the partition's name.
    """

    directories: tuple[str, ...] = ()
    chars: int = 12

    def __post_init__(self) -> None:
        if self.chars < 0:
            raise ValueError(f"PartitionRule.chars must be >= 0, got {self.chars}")
        if any(not d.endswith("/") for d in self.directories):
            raise ValueError(f"PartitionRule directories must end in '/', got {self.directories!r}")

    def partition(self, bucket: str, key: str) -> str:
        directory = max((d for d in self.directories if key.startswith(d)), key=len, default="")
        return f"{bucket}/{directory}{key[len(directory):len(directory) + self.chars]}"


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up; one token per request."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class Event:
    """One request the throttle saw (``at``: ``time.time()``, comparable across processes)."""

    at: float
    partition: str
    klass: Klass
    throttled: bool
    kind: KeyKind
    bytes: int


@dataclass
class PartitionCounts:
    """What one partition saw in a window of time."""

    requests: Counter[str] = field(default_factory=Counter)  # by class, throttled ones included
    throttled: Counter[str] = field(default_factory=Counter)
    peak_per_second: Counter[str] = field(default_factory=Counter)  # accepted, busiest wall-clock second


@dataclass
class Summary:
    """The throttle's counts over one window (``ThrottleProxy.summary``)."""

    seconds: float
    partitions: dict[str, PartitionCounts]
    index_gets: int  # accepted GET/HEAD of index objects (cloudckpt ``*.index``, DCP ``.metadata``)
    index_gets_throttled: int
    bytes_written: int  # bodies of accepted writes

    @property
    def requests(self) -> int:
        return sum(sum(p.requests.values()) for p in self.partitions.values())

    @property
    def throttled(self) -> int:
        return sum(sum(p.throttled.values()) for p in self.partitions.values())

    def busiest(self, klass: Klass) -> tuple[str, float, int]:
        """(partition, mean accepted requests/s over the window, peak in one second) of the busiest one."""
        if not self.partitions:
            return "-", 0.0, 0
        name, counts = max(self.partitions.items(),
                           key=lambda kv: kv[1].requests[klass] - kv[1].throttled[klass])
        accepted = counts.requests[klass] - counts.throttled[klass]
        return name, accepted / self.seconds if self.seconds > 0 else 0.0, counts.peak_per_second[klass]


def key_kind(key: str) -> KeyKind:
    if key.endswith(".index") or key.endswith("/.metadata"):
        return "index"
    if ".data-" in key or key.endswith(".distcp") or ".d/" in key:
        return "data"
    return "other"


class S3Throttle:
    """Per-partition token buckets, as a ``FaultProxy`` request policy (``action_for``).

    Args:
        write_rate / read_rate: accepted requests per second per partition.
        burst: seconds of unused rate a bucket can save up (its capacity is ``rate * burst``,
            at least one request).
        rule: how keys map to partitions.
    """

    def __init__(self, *, write_rate: float = 50.0, read_rate: float = 80.0, burst: float = 1.0,
                 rule: PartitionRule | None = None) -> None:
        if write_rate <= 0 or read_rate <= 0 or burst < 0:
            raise ValueError("S3Throttle rates must be positive and burst >= 0")
        self.rates: dict[Klass, float] = {"write": write_rate, "read": read_rate}
        self.burst = burst
        self.rule = rule or PartitionRule()
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, Klass], TokenBucket] = {}
        self.events: list[Event] = []

    def set_rule(self, rule: PartitionRule) -> None:
        """Partition by ``rule`` from now on (buckets of the old partitions keep their state)."""
        with self._lock:
            self.rule = rule

    def action_for(self, request: Request) -> Rule | None:
        bucket, _, key = request.path.lstrip("/").partition("/")
        if not key:  # a bucket-level request: listing (by its prefix), bulk delete, create
            key = request.query.get("prefix", [""])[0]
        klass: Klass = "read" if request.method in ("GET", "HEAD") else "write"
        with self._lock:
            partition = self.rule.partition(bucket, key)
            now = time.monotonic()
            limiter = self._buckets.get((partition, klass))
            if limiter is None:
                rate = self.rates[klass]
                limiter = self._buckets[(partition, klass)] = TokenBucket(rate, max(1.0, rate * self.burst), now)
            allowed = limiter.take(now)
            self.events.append(Event(time.time(), partition, klass, not allowed, key_kind(key),
                                     len(request.body) if allowed and klass == "write" else 0))
        if allowed:
            return None
        return Rule("status", status=503, code="SlowDown", message=SLOW_DOWN)

    def summary(self, start: float = 0.0, end: float = float("inf")) -> Summary:
        """Counts of the requests seen in ``[start, end]`` (``time.time()`` values)."""
        with self._lock:
            events = [e for e in self.events if start <= e.at <= end]
        return summarize(events, start, end)


def summarize(events: Iterable[Event], start: float, end: float) -> Summary:
    chosen = list(events)
    first = min((e.at for e in chosen), default=start)
    last = max((e.at for e in chosen), default=first)
    window = (end if end != float("inf") else last) - (start if start > 0 else first)
    partitions: dict[str, PartitionCounts] = {}
    per_second: Counter[tuple[str, str, int]] = Counter()
    index_gets = index_throttled = written = 0
    for e in chosen:
        counts = partitions.setdefault(e.partition, PartitionCounts())
        counts.requests[e.klass] += 1
        if e.throttled:
            counts.throttled[e.klass] += 1
        else:
            per_second[(e.partition, e.klass, int(e.at))] += 1
        if e.kind == "index" and e.klass == "read":
            if e.throttled:
                index_throttled += 1
            else:
                index_gets += 1
        written += e.bytes
    for (partition, klass, _), n in per_second.items():
        peak = partitions[partition].peak_per_second
        peak[klass] = max(peak[klass], n)
    return Summary(max(window, 0.0), partitions, index_gets, index_throttled, written)


class ThrottleProxy:
    """``with ThrottleProxy(upstream, ...) as proxy:`` point S3 clients at ``proxy.endpoint``.

    Arguments after ``upstream`` are ``S3Throttle``'s. ``proxy.throttle`` holds the counts.
    """

    def __init__(self, upstream: str, *, write_rate: float = 50.0, read_rate: float = 80.0, burst: float = 1.0,
                 rule: PartitionRule | None = None) -> None:
        self.throttle = S3Throttle(write_rate=write_rate, read_rate=read_rate, burst=burst, rule=rule)
        self._proxy = FaultProxy(upstream, record=False)
        self._proxy.faults = self.throttle

    @property
    def endpoint(self) -> str:
        return self._proxy.endpoint

    def summary(self, start: float = 0.0, end: float = float("inf")) -> Summary:
        return self.throttle.summary(start, end)

    def start(self) -> ThrottleProxy:
        self._proxy.start()
        return self

    def stop(self) -> None:
        self._proxy.stop()

    def __enter__(self) -> ThrottleProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
