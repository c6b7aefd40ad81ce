"""Throttling is back-pressure: fewer requests in flight while the store says "slow down".

Why: a store under load answers ``503 SlowDown`` (S3) or ``429`` (GCS) above a request
rate per prefix. A fleet of hosts that each keep their full concurrency and retry on a
fixed schedule turns that into a retry storm, and saves fail. So each storage object keeps
one ``AdaptiveConcurrency`` shared by all its threads and transfers - additive increase,
multiplicative decrease, as TCP does: a throttled answer halves the number of requests it
lets into flight (at most once per window of requests, so a burst of 503s from one window
counts once), and every successful request raises it by ``1 / limit`` (about one more
request in flight per window of successes), up to the configured ``max_concurrency``.

No clock is involved: the state moves with the answers only, so it is tested by its
state, and the retry policy's full-jitter backoff spreads a fleet's retries in time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What a storage object's requests met so far (``Storage.transfer_stats()``).

    Attributes:
        requests: requests answered (successes and failures, retries included).
        throttled: answers that asked to slow down (503 SlowDown, 429, GCS rate limits).
        retries: requests sent again after a transient failure or a throttled answer.
        concurrency: requests the store is let to have in flight now (``max_concurrency``
            unless throttling lowered it).
        min_concurrency: the lowest that limit went.
    """

    requests: int
    throttled: int
    retries: int
    concurrency: int
    min_concurrency: int


class AdaptiveConcurrency:
    """An AIMD limit on requests in flight, shared by every thread of one storage object."""

    def __init__(self, maximum: int, *, decrease: float = 0.5) -> None:
        if maximum < 1:
            raise ValueError(f"maximum concurrency must be >= 1, got {maximum}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease factor must be in (0, 1), got {decrease}")
        self._maximum = maximum
        self._decrease = decrease
        self._limit = float(maximum)
        self._lowest = maximum
        self._in_flight = 0
        self._since_decrease = maximum  # answers since the last decrease; a window is ``limit`` of them
        self._requests = self._throttled = self._retries = 0
        self._changed = threading.Condition()

    @property
    def limit(self) -> int:
        """Requests allowed in flight now (at least one)."""
        with self._changed:
            return self._allowed()

    def _allowed(self) -> int:
        return max(1, int(self._limit))

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the allowed request slots for the duration of one request.

        Waiting is bounded by the requests in flight: each holds a slot for one request,
        and every request is bounded by its timeouts.
        """
        with self._changed:
            while self._in_flight >= self._allowed():
                self._changed.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify()

    def succeeded(self) -> None:
        """One request got an answer that was not throttling: grow by ``1 / limit``."""
        with self._changed:
            self._requests += 1
            self._since_decrease += 1
            before = self._allowed()
            self._limit = min(float(self._maximum), self._limit + 1.0 / self._limit)
            if self._allowed() > before:
                self._changed.notify_all()

    def failed(self) -> None:
        """One request failed for another reason (counted, the limit stays)."""
        with self._changed:
            self._requests += 1
            self._since_decrease += 1

    def throttled(self) -> None:
        """One request was told to slow down: shrink, at most once per window of answers."""
        with self._changed:
            self._requests += 1
            self._throttled += 1
            if self._since_decrease >= self._allowed():
                self._limit = max(1.0, self._limit * self._decrease)
                self._lowest = min(self._lowest, self._allowed())
                self._since_decrease = 0
            else:
                self._since_decrease += 1

    def retried(self) -> None:
        with self._changed:
            self._retries += 1

    def stats(self) -> TransferStats:
        with self._changed:
            return TransferStats(self._requests, self._throttled, self._retries, self._allowed(), self._lowest)
