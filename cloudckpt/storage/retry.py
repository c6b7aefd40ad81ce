"""The one retry layer: jittered exponential backoff, bounded in attempts and time.

Why here and not in the SDKs: botocore and google-cloud-storage each retry on their own;
stacking three layers multiplies waits (3 x 5 x 5 attempts) and hides what happened.
Backends switch the SDK retries off and classify failures for this layer instead.

Two budgets: a transient failure (5xx, reset, timeout) is retried ``max_attempts`` times
within ``deadline`` seconds - a dead endpoint must fail fast. A *throttled* answer (503
SlowDown, 429) is the store asking for fewer requests, which the storage's adaptive
concurrency gives it (``throttle.py``); those are retried until ``throttle_deadline``
(minutes by default), however many tries that takes, each wait drawn with full jitter so
a fleet of hosts does not retry in lockstep.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")

log = logging.getLogger("cloudckpt.storage")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a transient failure is retried before it surfaces as ``TransientError``.

    Attributes:
        max_attempts: total tries, including the first (>= 1), for transient failures.
        initial_backoff: seconds before the second try; doubles each time ("full jitter").
        max_backoff: cap on one wait.
        deadline: cap on the total seconds spent waiting, so a dead endpoint fails fast.
        throttle_deadline: how long throttled answers (503 SlowDown, 429) are retried, in
            seconds: the store is alive and asking for fewer requests, so throttling is
            ridden out for minutes, not for a fixed number of tries.
    """

    max_attempts: int = 6
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    deadline: float = 60.0
    throttle_deadline: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if min(self.initial_backoff, self.max_backoff, self.deadline, self.throttle_deadline) < 0:
            raise ValueError("RetryPolicy backoffs and deadlines must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based), full jitter."""
        ceiling = min(self.max_backoff, self.initial_backoff * (2 ** (attempt - 1)))
        return random.uniform(0, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)


class Gate(Protocol):
    """What the retry loop reports to (``throttle.AdaptiveConcurrency``)."""

    def slot(self) -> AbstractContextManager[None]: ...
    def succeeded(self) -> None: ...
    def failed(self) -> None: ...
    def throttled(self) -> None: ...
    def retried(self) -> None: ...


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    describe: str,
    on_retry: Callable[[BaseException, int], None] | None = None,
    is_throttle: Callable[[BaseException], bool] | None = None,
    gate: Gate | None = None,
) -> T:
    """Run ``fn`` until it succeeds, fails permanently, or the policy is exhausted.

    The last transient exception is re-raised unchanged when the budget runs out; the
    backend's error translation turns it into a ``TransientError`` naming the key.
    ``on_retry`` lets conditional writes remember that an earlier attempt may have landed.
    ``is_throttle`` picks the answers that ask to slow down: they are retried until
    ``policy.throttle_deadline`` and reported to ``gate``, which holds a request slot
    around every try and lowers the concurrency when told to.
    """
    started = time.monotonic()
    attempt = throttles = 1
    while True:
        try:
            with gate.slot() if gate is not None else nullcontext():
                result = fn()
        except Exception as exc:
            throttle = is_throttle is not None and is_throttle(exc)
            if gate is not None:
                (gate.throttled if throttle else gate.failed)()
            elapsed = time.monotonic() - started
            if throttle:
                wait = policy.backoff(throttles)
                if elapsed + wait > policy.throttle_deadline:
                    raise
                throttles += 1
                log.info("%s throttled (%d so far); retrying in %.2f s: %s", describe, throttles - 1, wait, exc)
            else:
                if not is_transient(exc) or attempt >= policy.max_attempts:
                    raise
                wait = policy.backoff(attempt)
                if elapsed + wait > policy.deadline:
                    raise
                log.warning("retrying %s after transient error (attempt %d/%d): %s",
                            describe, attempt, policy.max_attempts, exc)
                attempt += 1
            if on_retry is not None:
                on_retry(exc, attempt + throttles - 2)
            if gate is not None:
                gate.retried()
            time.sleep(wait)
            continue
        if gate is not None:
            gate.succeeded()
        return result
