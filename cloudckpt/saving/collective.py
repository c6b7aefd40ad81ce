"""What the ranks of a save tell each other: the messages, and the waits and failures between them.

Small frozen dataclasses travel through the coordinator's object collectives (pickled
between the processes of one job by ``torch.distributed``; never part of the format).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cloudckpt.coordination import Coordinator
from cloudckpt.errors import CoordinationError, DistributedSaveError
from cloudckpt.format import DataObject
from cloudckpt.saving.objects import PieceId, StoredPiece
from cloudckpt.saving.plan import DescribeFailure

_POLL_MIN = 0.005
_POLL_MAX = 0.5

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Report:
    """One rank's result, gathered to the committer: where its pieces are, or why it failed.

    ``objects`` are the data objects it wrote, ``reused`` the base checkpoint's objects
    (name -> size) some of its pieces point at instead.
    """

    error: str | None = None
    objects: tuple[DataObject, ...] = ()
    pieces: Mapping[PieceId, StoredPiece] = field(default_factory=dict)
    reused: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the committer broadcasts: the commit, or every rank's failure."""

    ok: bool
    failures: Mapping[int, str] = field(default_factory=dict)
    committed: bool = False
    concurrent: str | None = None
    version: str | None = None
    bytes: int = 0
    objects: int = 0
    data_keys: tuple[str, ...] = ()
    reused_bytes: int = 0


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def failure_message(url: str, failures: Mapping[int, str]) -> str:
    lines = "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(failures.items()))
    return (f"multi-host save of {url} failed on {len(failures)} rank(s) - {lines}. No index was written, "
            f"so no part of this save is visible; the previous checkpoint (if any) is unchanged")


def announce_failure(coordinator: Coordinator, url: str, error: BaseException) -> BaseException:
    """Join a save's first collective with ``error`` (this rank could not even collect its state).

    The other ranks are already in ``start``; without this they would wait for the group's
    timeout. Returns the ``DistributedSaveError`` every rank raises.
    """
    with coordinator.session():
        cause = describe_error(error)
        try:
            descriptions = coordinator.all_gather_object(DescribeFailure(cause))
        except CoordinationError as exc:
            return DistributedSaveError(f"multi-host save of {url} failed: {exc}", {coordinator.rank: cause})
    failed = {r: d.error for r, d in enumerate(descriptions) if isinstance(d, DescribeFailure)}
    return DistributedSaveError(failure_message(url, failed), failed)


def wait_for_every_rank(coord: Coordinator, future: Future[Any]) -> None:
    """Short collectives until every rank's ``future`` (its upload) finished, success or failure.

    Why polling instead of one collective after the upload: a collective waits at most the
    group's timeout, and a large upload may take longer; many short ones let a slow upload
    take as long as it needs while a host that stops answering still fails every rank
    within the timeout. Shared by ``SaveRun`` and the DCP writer (``cloudckpt.dcp``).

    Raises:
        CoordinationError: a rank stopped answering.
    """
    delay = _POLL_MIN
    while True:
        done = future.done()
        flags = coord.all_gather_object(done)
        if all(flags):
            return
        if done:
            time.sleep(delay)
        else:
            wait_futures([future], timeout=delay)
        delay = min(delay * 2, _POLL_MAX)


def start_polled(work: Callable[[], T], *, background: bool, name: str) -> Future[T]:
    """``work`` (a rank's upload) as a future: on a worker thread named ``name`` when ``background``
    (the other ranks must be polled meanwhile, ``wait_for_every_rank``), else run here and now.

    An ``Exception`` becomes the future's, so a failed rank still takes part in the polling
    and the report that follow; a ``BaseException`` (Ctrl-C) propagates, and the caller
    removes what the upload started. Shared by ``SaveRun`` and the DCP writer.
    """
    if not background:
        future: Future[T] = Future()
        try:
            future.set_result(work())
        except Exception as exc:
            future.set_exception(exc)
        return future
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)
