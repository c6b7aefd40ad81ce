"""Throttling as back-pressure: the adaptive concurrency limit and the retry budgets, by their state."""

from __future__ import annotations

import threading

import pytest

from cloudckpt.storage.retry import RetryPolicy, call_with_retry
from cloudckpt.storage.throttle import AdaptiveConcurrency

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0, deadline=10, throttle_deadline=10)


class Throttled(Exception):
    pass


class Flaky(Exception):
    pass


def test_a_throttled_answer_halves_the_limit_once_per_window() -> None:
    gate = AdaptiveConcurrency(16)
    gate.throttled()
    assert gate.limit == 8
    for _ in range(8):  # a window of answers (the new limit of them): one decrease for the burst
        gate.throttled()
    assert gate.limit == 8
    gate.throttled()  # a full window later, still throttled: halve again
    assert gate.limit == 4
    for _ in range(100):
        gate.throttled()
    assert gate.limit == 1  # never below one request in flight
    stats = gate.stats()
    assert (stats.throttled, stats.min_concurrency) == (110, 1)


def test_successes_raise_the_limit_back_to_the_maximum() -> None:
    gate = AdaptiveConcurrency(8)
    for _ in range(40):
        gate.throttled()
    assert gate.limit == 1
    seen = []
    for _ in range(60):
        gate.succeeded()
        seen.append(gate.limit)
    assert seen == sorted(seen)  # additive increase: never down on success
    assert seen[0] == 2 and seen[-1] == 8  # about one more request per window of successes
    assert gate.stats().concurrency == 8
    gate.failed()  # other failures leave the limit alone
    assert gate.limit == 8


def test_requests_in_flight_never_exceed_the_limit() -> None:
    """Many threads through one gate while it is throttled: each request starts within the limit."""
    gate = AdaptiveConcurrency(8)
    lock = threading.Lock()
    in_flight = 0
    violations: list[tuple[int, int]] = []
    calls = 0

    def request() -> str:
        nonlocal in_flight, calls
        with lock:
            in_flight += 1
            calls += 1
            throttle = calls <= 30
            if in_flight > gate.limit:
                violations.append((in_flight, gate.limit))
        try:
            threading.Event().wait(0.001)  # a request takes a moment; no assertion on time
            if throttle:
                raise Throttled()
            return "ok"
        finally:
            with lock:
                in_flight -= 1

    results: list[str] = []

    def worker() -> None:
        for _ in range(5):
            results.append(call_with_retry(request, policy=FAST, is_transient=lambda e: False, describe="GET",
                                           is_throttle=lambda e: isinstance(e, Throttled), gate=gate))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == ["ok"] * 80
    assert violations == []
    stats = gate.stats()
    assert stats.throttled == 30 and stats.retries == 30 and stats.min_concurrency < 8


def test_throttling_is_retried_past_the_transient_budget() -> None:
    failures = iter([Throttled()] * 10)

    def request() -> str:
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return "ok"

    gate = AdaptiveConcurrency(4)
    assert call_with_retry(request, policy=FAST, is_transient=lambda e: True, describe="PUT",
                           is_throttle=lambda e: isinstance(e, Throttled), gate=gate) == "ok"
    assert gate.stats().retries == 10 > FAST.max_attempts


def test_other_transient_failures_keep_their_bounded_attempts() -> None:
    tries = 0

    def request() -> str:
        nonlocal tries
        tries += 1
        raise Flaky()

    with pytest.raises(Flaky):
        call_with_retry(request, policy=FAST, is_transient=lambda e: True, describe="PUT",
                        is_throttle=lambda e: isinstance(e, Throttled), gate=AdaptiveConcurrency(4))
    assert tries == FAST.max_attempts


def test_the_throttle_deadline_ends_throttling() -> None:
    tries = 0

    def request() -> str:
        nonlocal tries
        tries += 1
        raise Throttled()

    policy = RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0, throttle_deadline=0)
    with pytest.raises(Throttled):
        call_with_retry(request, policy=policy, is_transient=lambda e: True, describe="GET",
                        is_throttle=lambda e: isinstance(e, Throttled))
    assert tries == 1  # no time left to wait at all


def test_backoff_is_full_jitter_within_its_ceiling() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=4.0)
    waits = [policy.backoff(attempt) for attempt in (1, 2, 3, 4, 5, 6) for _ in range(200)]
    assert all(0 <= w <= 4.0 for w in waits)
    assert min(waits) < 0.05 and max(waits) > 3.0  # spread from zero to the ceiling: hosts do not retry in step
    with pytest.raises(ValueError, match="deadlines"):
        RetryPolicy(throttle_deadline=-1)
