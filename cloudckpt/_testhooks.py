"""Test hooks in production code: named places where a test can kill a saving process.

This module exists only for the test suite (tests/test_crash_consistency.py and its
tests/crash_worker.py); it is private (leading underscore), no public API names it, and it
does nothing unless the test-only environment variable below is set. It sits at the bottom
of the layers (it imports nothing of cloudckpt) so that saving/ and manager/ can call it.

Its job: prove crashes are harmless.

The crash-consistency suite runs a training loop in a subprocess with
``CLOUDCKPT_CRASH_AT=<point>[:<n>]`` and checks that a fresh process restores exactly
what the killed one last saved. ``<n>`` (default 1) picks the n-th time the point is
reached. The process dies by SIGKILL - no ``finally`` blocks, no atexit, no flush - which
is what a preempted VM does. With the variable unset (always, outside tests) a crash
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

CRASH_ENV = "CLOUDCKPT_CRASH_AT"

#: Every point the library reaches, in the order one managed save passes them.
POINTS = (
    "after_data_upload",   # data objects uploaded, index not yet written
    "after_index_write",   # index committed, replaced data not yet deleted, state file not yet written
    "after_state_write",   # state file names the new checkpoint, evictions not yet deleted
    "after_delete_index",  # an evicted checkpoint's index deleted, its data objects not yet
    "after_delete_data",   # an evicted checkpoint's data objects deleted
)

_counts: dict[str, int] = {}
_lock = threading.Lock()


def _target() -> tuple[str, int] | None:
    raw = os.environ.get(CRASH_ENV)
    if not raw:
        return None
    point, _, nth = raw.partition(":")
    if point not in POINTS:
        raise ValueError(f"{CRASH_ENV}={raw!r}: unknown crash point {point!r}; known: {', '.join(POINTS)}")
    return point, int(nth or 1)


def crash_point(point: str) -> None:
    """SIGKILL this process if ``CLOUDCKPT_CRASH_AT`` names ``point`` and this is its n-th visit."""
    target = _target()
    if target is None or target[0] != point:
        return
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        if _counts[point] == target[1]:
            os.kill(os.getpid(), signal.SIGKILL)
