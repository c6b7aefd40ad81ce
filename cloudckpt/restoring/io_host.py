"""Restoring through the io host: with ``experimental_io_device`` set, only that host reads.

The same trade as for saving (docs/distributed.md): for jobs where one host alone has
credentials or a route to the bucket, that host fetches the index and every byte range
any host needs, and sends each host its bytes over the engine. It costs that host's
bandwidth and the memory of the other hosts' ranges (held until sent).

Call order, on every rank (collectives marked *)::

    index   the io host loads and validates the index; *broadcast of it (or of the error) -
            ``shared_index``, which every collective restore uses (without an io_device,
            rank 0 reads it: one index read per job, whatever the number of hosts)
    read    *all_gather of every rank's byte ranges (object, offset, length); the io host
            reads them all; *broadcast of its outcome; then, for each other rank r,
            *transfer of r's bytes from the io host to r

Every rank passes through each collective exactly once per restore, whatever it needs
(possibly nothing). A host's own validation error before the read (a shape mismatch)
leaves the others waiting for the group's timeout, which then fails them clearly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from cloudckpt.coordination import Coordinator
from cloudckpt.errors import CheckpointFormatError, CheckpointNotFoundError, StorageError
from cloudckpt.format import CheckpointIndex, index_key
from cloudckpt.format.index_fetch import load_index
from cloudckpt.restoring.array_reads import read_coalesced
from cloudckpt.storage import Location, ReadRequest, Storage


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class SharedIndex:
    """The io host's broadcast: the index it read and validated, or why it could not."""

    index: CheckpointIndex | None = None
    kind: Literal["not_found", "format", "other"] | None = None
    error: str = ""
    described: str = ""


@dataclass(frozen=True, slots=True)
class WantedRange:
    """One byte range a host needs, sent to the io host."""

    key: str
    offset: int
    length: int


class ReadRelay:
    """The io host reads for every host of a restore (see the module docs)."""

    def __init__(self, coordinator: Coordinator, io_rank: int) -> None:
        self.coord = coordinator
        self.io_rank = io_rank

    @property
    def is_io(self) -> bool:
        return self.coord.rank == self.io_rank

    def load_index(self, location: Location) -> CheckpointIndex:
        """The index, read and validated by the io host and broadcast; its failure is every host's."""
        return shared_index(self.coord, location, self.io_rank)


    def read(self, storage: Storage, requests: Sequence[ReadRequest]) -> None:
        """Fill ``requests`` (this host's byte ranges) with bytes the io host read."""
        with self.coord.session():
            wanted: list[list[WantedRange]] = self.coord.all_gather_object(
                [WantedRange(r.key, r.offset, r.out.nbytes) for r in requests])
            failure: BaseException | None = None
            outgoing: dict[int, list[NDArray[np.uint8]]] = {}
            if self.is_io:
                try:
                    read_coalesced(storage, requests)
                    for rank, ranges in enumerate(wanted):
                        if rank == self.io_rank:
                            continue
                        buffers = [np.empty(w.length, dtype=np.uint8) for w in ranges]
                        read_coalesced(storage, [ReadRequest(w.key, w.offset, buf.data)
                                                 for w, buf in zip(ranges, buffers, strict=True)])
                        outgoing[rank] = buffers
                except Exception as exc:
                    failure = exc
            error = self.coord.broadcast_object(None if failure is None else _describe(failure), src=self.io_rank)
            if failure is not None:
                raise failure
            if error is not None:
                raise StorageError(f"the io host (rank {self.io_rank}) could not read this restore's data: {error}",
                                   storage.url)
            mine = [np.frombuffer(r.out, dtype=np.uint8) for r in requests]
            for rank in range(self.coord.world_size):
                if rank == self.io_rank:
                    continue
                self.coord.transfer(rank, outgoing.get(rank, []) if self.is_io else [],
                                    {self.io_rank: mine} if rank == self.coord.rank else {})


def shared_index(coordinator: Coordinator, location: Location, reader: int,
                 load: Callable[[Location], CheckpointIndex] | None = None) -> CheckpointIndex:
    """The index of a collective restore: ``reader`` alone reads and validates it, every rank gets it.

    Why: on thousands of hosts, every host GETting the same index object at the same moment is
    a request storm on one key (and a validation pass per host); one read, one broadcast is
    one request. ``load`` reads it on ``reader`` (default: ``index_fetch.load_index``); its
    failure is every rank's, with the same error type where it travels (not found, malformed).
    """
    storage, name = location.storage, location.name
    url = storage.url_for(index_key(name))
    with coordinator.session():
        outcome: SharedIndex | None = None
        failure: BaseException | None = None
        if coordinator.rank == reader:
            try:
                outcome = SharedIndex(index=(load or _load)(location))
            except Exception as exc:
                failure = exc
                kind: Literal["not_found", "format", "other"] = (
                    "not_found" if isinstance(exc, CheckpointNotFoundError)
                    else "format" if isinstance(exc, CheckpointFormatError) else "other")
                outcome = SharedIndex(kind=kind, error=str(exc), described=_describe(exc))
        shared: SharedIndex = coordinator.broadcast_object(outcome, src=reader)
    if failure is not None:
        raise failure
    if shared.index is not None:
        return shared.index
    if shared.kind == "not_found":
        raise CheckpointNotFoundError(shared.error, storage.url_for(name))
    if shared.kind == "format":
        raise CheckpointFormatError(shared.error)
    raise StorageError(f"rank {reader} could not read {url} for this restore: {shared.described}", url)


def _load(location: Location) -> CheckpointIndex:
    return load_index(location.storage, location.name)
