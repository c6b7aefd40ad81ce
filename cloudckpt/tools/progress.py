"""How a long tool (verify, copy, export) reports bytes done, without knowing who shows them.

The library functions take a :data:`ProgressFactory`; the CLI passes one that draws a bar
(``cloudckpt.cli.common.Progress``), code calling the functions directly passes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class ProgressSink(Protocol):
    """Where one operation's bytes done go (called from worker threads: must be thread-safe)."""

    def update(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


#: Starts reporting one operation: (total bytes, description) -> its sink.
ProgressFactory = Callable[[int, str], ProgressSink]


class _Silent:
    def update(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


def silent(total: int, description: str) -> ProgressSink:
    """The default: nothing is shown."""
    return _Silent()


@contextmanager
def reporting(factory: ProgressFactory, total: int, description: str) -> Iterator[ProgressSink]:
    """One operation's sink, closed when it ends (however it ends)."""
    sink = factory(total, description)
    try:
        yield sink
    finally:
        sink.close()
