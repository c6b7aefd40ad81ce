"""The one retry layer: jittered exponential backoff, bounded in attempts and time.

Why here and not in the SDKs: botocore and google-cloud-storage each retry on their own;
stacking three layers multiplies waits (3 x 5 x 5 attempts) and hides what happened.
Backends switch the SDK retries off and classify failures for this layer instead.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger("cloudckpt.storage")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a transient failure is retried before it surfaces as ``TransientError``.

    Attributes:
        max_attempts: total tries, including the first (>= 1).
        initial_backoff: seconds before the second try; doubles each time ("full jitter").
        max_backoff: cap on one wait.
        deadline: cap on the total seconds spent waiting, so a dead endpoint fails fast.
    """

    max_attempts: int = 6
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    deadline: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.deadline < 0:
            raise ValueError("RetryPolicy backoffs and deadline must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based), full jitter."""
        ceiling = min(self.max_backoff, self.initial_backoff * (2 ** (attempt - 1)))
        return random.uniform(0, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    describe: str,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """Run ``fn`` until it succeeds, fails permanently, or the policy is exhausted.

    The last transient exception is re-raised unchanged when the budget runs out; the
    backend's error translation turns it into a ``TransientError`` naming the key.
    ``on_retry`` lets conditional writes remember that an earlier attempt may have landed.
    """
    started = time.monotonic()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt >= policy.max_attempts:
                raise
            wait = policy.backoff(attempt)
            if time.monotonic() - started + wait > policy.deadline:
                raise
            log.warning("retrying %s after transient error (attempt %d/%d): %s",
                        describe, attempt, policy.max_attempts, exc)
            if on_retry is not None:
                on_retry(exc, attempt)
            time.sleep(wait)
            attempt += 1
