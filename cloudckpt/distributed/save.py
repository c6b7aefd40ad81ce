"""The multi-host save protocol: describe -> plan -> write (or send) -> wait -> commit -> outcome.

Call order, on every rank (collectives marked *)::

    describe     committer HEADs the index; every rank lists its pieces
    *all_gather  descriptions; every rank computes the same SavePlan (plan.py) - names,
                 suffix and who writes which replica are agreed before any byte moves
    write        io_device unset: each rank uploads its own data objects
                 io_device=K: *transfer of every other rank's pieces to K; K uploads all
    *poll        short all_gathers of "done?" while uploads run: a slow upload is fine,
                 a host that stops answering fails everyone within the group's timeout
    *gather      each rank's chunks (object, byte range, CRC32C) and failure to the committer
    commit       only if no rank failed: the committer PUTs the index (the commit point)
    *broadcast   the outcome; every rank returns it or raises the same error

No index is written unless every rank finished its data, so a failed rank never leaves
a half checkpoint visible; each rank deletes its own data objects after a failure. If
the outcome cannot be learnt (the committer died after the commit), a rank that can see
storage looks at the index before it says anything: an index naming this write's
objects means the checkpoint is complete, and the error says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.crashpoints import crash_point
from cloudckpt.distributed.coordinator import Coordinator
from cloudckpt.distributed.plan import SavePlan, describe, make_plan
from cloudckpt.errors import (
    CheckpointFormatError,
    ConcurrentWriterError,
    CoordinationError,
    DistributedSaveError,
    NotFoundError,
)
from cloudckpt.format import Chunk, DataObject, decode_index, dtype_name, index_key, parse_dtype
from cloudckpt.graph import ArrayLeaf, Collected, ShardedLeaf
from cloudckpt.storage import ObjectMeta, Storage
from cloudckpt.writer import (
    PieceCrc,
    PieceId,
    WritePlan,
    WriteResult,
    assemble_index,
    commit,
    delete_replaced,
    discard,
    head_index,
    locate,
    new_suffix,
    pieces_of,
    plan_objects,
    upload,
)

log = logging.getLogger("cloudckpt.distributed")

_POLL_MIN = 0.005
_POLL_MAX = 0.5


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failure_message(path: str, failures: Mapping[int, str]) -> str:
    lines = "; ".join(f"rank {rank}: {cause}" for rank, cause in sorted(failures.items()))
    return (f"multi-host save of {path} failed on {len(failures)} rank(s) - {lines}. No index was written, "
            f"so no part of this save is visible; the previous checkpoint (if any) is unchanged")


def _arrays(entries: Mapping[str, Collected]) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path, item in entries.items():
        if isinstance(item, ArrayLeaf):
            out[path] = (dtype_name(item.array.dtype), tuple(item.array.shape))
        elif isinstance(item, ShardedLeaf):
            out[path] = (dtype_name(item.dtype), item.shape)
    return out


def save(coordinator: Coordinator, storage: Storage, name: str, entries: Mapping[str, Collected], *,
         metadata: Mapping[str, Any] | None = None, io_rank: int | None = None,
         after_commit: Callable[[WriteResult], None] | None = None) -> WriteResult:
    """Run the protocol on this rank (every rank calls it with its own entries); return what was committed.

    ``after_commit`` (the state file of ``Checkpoint.save``, a manager's bookkeeping) runs
    on the committing rank right after the commit and *before* the outcome is
    broadcast, so when ``save`` returns on any rank, the bookkeeping is done too; its
    failure is every rank's failure (with ``committed=True``: the checkpoint exists).

    Raises:
        DistributedSaveError: any rank failed (each rank raises the same list).
        ConcurrentWriterError: the commit lost to another writer (on every rank).
        CoordinationError: wrapped in ``DistributedSaveError``: a host died or timed out.
    """
    with coordinator.session():
        return _Save(coordinator, storage, name, entries, metadata, io_rank, after_commit).run()


def announce_failure(coordinator: Coordinator, url: str, error: BaseException) -> DistributedSaveError:
    """Join a save's first collective with ``error`` (this rank could not even collect its state).

    The other ranks are already in ``save``; without this they would wait for the group's
    timeout. Returns the error every rank raises (the caller raises it).
    """
    with coordinator.session():
        cause = _describe_error(error)
        mine: dict[str, Any] = {"ok": False, "error": cause}
        try:
            descriptions = coordinator.all_gather_object(mine)
        except CoordinationError as exc:
            return DistributedSaveError(f"multi-host save of {url} failed: {exc}", {coordinator.rank: cause})
    failed = {r: d["error"] for r, d in enumerate(descriptions) if not d["ok"]}
    return DistributedSaveError(_failure_message(url, failed), failed)


class _Save:
    def __init__(self, coordinator: Coordinator, storage: Storage, name: str, entries: Mapping[str, Collected],
                 metadata: Mapping[str, Any] | None, io_rank: int | None,
                 after_commit: Callable[[WriteResult], None] | None) -> None:
        self.coord = coordinator
        self.rank = coordinator.rank
        self.storage = storage
        self.name = name
        self.url = storage.url_for(name)
        self.entries = entries
        self.metadata = metadata
        self.io_rank = io_rank
        self.committer = 0 if io_rank is None else io_rank
        self.touches_storage = io_rank is None or io_rank == self.rank
        self.write_plan: WritePlan | None = None
        self.after_commit = after_commit

    # ------------------------------------------------------------------ phases
    def run(self) -> WriteResult:
        seen: ObjectMeta | None = None
        pieces = pieces_of(self.entries)
        try:
            if self.rank == self.committer:
                # HEAD before anyone uploads: a rival commit during our upload then fails ours.
                seen = head_index(self.storage, self.name)
            mine: dict[str, Any] = describe(pieces, _arrays(self.entries), suffix=new_suffix(),
                                            max_objects=self.storage.config.max_concurrency, url=self.url)
        except Exception as exc:
            mine = {"ok": False, "error": _describe_error(exc)}
        descriptions = self._collective(lambda: self.coord.all_gather_object(mine))
        failed = {r: d["error"] for r, d in enumerate(descriptions) if not d["ok"]}
        if failed:
            raise DistributedSaveError(_failure_message(self.url, failed), failed)
        try:
            plan = make_plan(descriptions, committer=self.committer, io_rank=self.io_rank)
        except ValueError as exc:
            raise DistributedSaveError(f"multi-host save of {self.url} was not started: {exc}",
                                       {self.rank: str(exc)}) from exc
        local_error: BaseException | None = None
        located: dict[PieceId, Chunk] = {}
        try:
            try:
                future = self._start_upload(plan, self._gather_bytes(plan, pieces, descriptions))
            except CoordinationError:
                raise
            except Exception as exc:  # still take part in the polling, or the others would hang
                future = Future()
                future.set_exception(exc)
            if self.coord.world_size > 1:
                self._poll(future)
            crcs = future.result()
            assert self.write_plan is not None
            located = locate(self.write_plan, crcs)
        except CoordinationError as exc:
            self._discard()
            raise DistributedSaveError(f"multi-host save of {self.url} failed: {exc}", {self.rank: str(exc)}) from exc
        except Exception as exc:
            local_error = exc
        report = self._report(local_error, located)
        reports = self._collective(lambda: self.coord.gather_object(report, dst=self.committer))
        outcome: dict[str, Any] | None = None
        commit_error: BaseException | None = None
        stale: list[str] = []
        if self.rank == self.committer:
            assert reports is not None
            outcome, commit_error, stale = self._commit(plan, reports, seen)
        try:
            outcome = self.coord.broadcast_object(outcome, src=self.committer)
        except CoordinationError as exc:
            return self._outcome_lost(plan, exc)
        assert outcome is not None
        if not outcome["ok"]:
            if not outcome.get("committed"):
                self._discard()
            failures = {int(r): str(c) for r, c in outcome["failures"]}
            if outcome.get("committed"):
                if commit_error is not None:
                    raise commit_error  # the committer's own bookkeeping error, as the single-host path raises it
                raise DistributedSaveError(
                    f"multi-host save of {self.url}: the checkpoint is complete and valid (its index was committed), "
                    f"but the committing host's bookkeeping after the commit failed - rank {plan.committer}: "
                    f"{failures.get(plan.committer)}", failures, committed=True)
            if outcome.get("concurrent"):
                message = outcome["concurrent"]
                if isinstance(commit_error, ConcurrentWriterError):
                    raise commit_error
                raise ConcurrentWriterError(message)
            error = DistributedSaveError(_failure_message(self.url, failures), failures)
            raise error from (local_error or commit_error)
        if self.rank == self.committer:
            delete_replaced(self.storage, self.name, stale)
        return WriteResult(self.name, int(outcome["bytes"]), int(outcome["objects"]), outcome["version"],
                           tuple(outcome["data_keys"]))

    def _collective(self, call: Any) -> Any:
        try:
            return call()
        except CoordinationError as exc:
            self._discard()
            raise DistributedSaveError(f"multi-host save of {self.url} failed: {exc}", {self.rank: str(exc)}) from exc

    def _gather_bytes(self, plan: SavePlan, pieces: Mapping[PieceId, NDArray[Any]],
                      descriptions: list[Any]) -> dict[PieceId, NDArray[Any]]:
        """The pieces this rank uploads: its own, plus (io host) everyone else's, received."""
        if plan.io_rank is None:
            return {p: pieces[p] for group in plan.groups[self.rank] for p in group}
        if self.rank != plan.io_rank:
            outgoing = [pieces[p].reshape(-1).view(np.uint8) for p in plan.sent_by(self.rank)]
            self.coord.transfer(plan.io_rank, [o for o in outgoing if o.nbytes], {})
            return {}
        dtypes = {path: parse_dtype(dtype) for d in descriptions for path, (dtype, _) in d["arrays"].items()}
        out: dict[PieceId, NDArray[Any]] = {}
        incoming: dict[int, list[NDArray[np.uint8]]] = {}
        for piece, writer in plan.writer.items():
            info = plan.pieces[piece]
            if writer == self.rank:
                out[piece] = pieces[piece]
                continue
            buffer = np.empty(info.nbytes, dtype=np.uint8)
            if info.nbytes:
                incoming.setdefault(writer, []).append(buffer)
            out[piece] = buffer.view(dtypes[piece[0]]).reshape(info.shape)
        self.coord.transfer(self.rank, [], incoming)
        return out

    def _start_upload(self, plan: SavePlan, data: dict[PieceId, NDArray[Any]]) -> Future[dict[PieceId, PieceCrc]]:
        """Start uploading this rank's data objects (on a worker thread when others must be polled)."""
        groups = plan.groups[self.rank]
        self.write_plan = write_plan = plan_objects(
            self.name, self.entries, data, groups, 0, suffix=plan.suffix, index_offset=plan.offsets[self.rank],
            total_objects=plan.total_objects)
        if self.coord.world_size == 1 or not groups:
            future: Future[dict[PieceId, PieceCrc]] = Future()
            try:
                future.set_result(upload(self.storage, write_plan, range(len(groups))))
            except Exception as exc:
                future.set_exception(exc)
            return future
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudckpt-dist-upload")
        try:
            return pool.submit(upload, self.storage, write_plan, range(len(groups)))
        finally:
            pool.shutdown(wait=False)

    def _poll(self, future: Future[Any]) -> None:
        """Short collectives until every rank's upload finished (success or failure)."""
        delay = _POLL_MIN
        while True:
            done = future.done()
            flags = self.coord.all_gather_object(done)
            if all(flags):
                return
            if done:
                time.sleep(delay)
            else:
                wait_futures([future], timeout=delay)
            delay = min(delay * 2, _POLL_MAX)

    def _report(self, error: BaseException | None, located: Mapping[PieceId, Chunk]) -> dict[str, Any]:
        if error is not None:
            return {"ok": False, "error": _describe_error(error)}
        plan = self.write_plan
        objects = [] if plan is None else [[o.key, o.size] for o in plan.objects]
        chunks = [[path, list(start), c.object, c.offset, c.length, c.crc32c, list(c.shape), c.block_size,
                   list(c.block_crc32c)] for (path, start), c in located.items()]
        return {"ok": True, "objects": objects, "chunks": chunks}

    def _commit(self, plan: SavePlan, reports: list[Any], seen: ObjectMeta | None
                ) -> tuple[dict[str, Any], BaseException | None, list[str]]:
        failures = [[r, rep["error"]] for r, rep in enumerate(reports) if not rep["ok"]]
        if failures:
            return {"ok": False, "failures": failures}, None, []
        objects: dict[int, DataObject] = {}
        chunks: dict[PieceId, Chunk] = {}
        for rank, rep in enumerate(reports):
            for k, (key, size) in enumerate(rep["objects"]):
                objects[plan.offsets[rank] + k] = DataObject(str(key), int(size))
            for path, start, obj, offset, length, crc, shape, block_size, blocks in rep["chunks"]:
                chunks[(str(path), tuple(start))] = Chunk(int(obj), int(offset), int(length), int(crc), tuple(start),
                                                          tuple(shape), int(block_size), tuple(int(b) for b in blocks))
        ordered = tuple(objects[k] for k in range(plan.total_objects))
        try:
            index = assemble_index(self.name, self.entries, ordered, chunks, self.metadata)
            size, version, stale = commit(self.storage, index, seen)
            crash_point("after_index_write")
        except ConcurrentWriterError as exc:
            return ({"ok": False, "failures": [[self.rank, _describe_error(exc)]], "concurrent": str(exc)}, exc, [])
        except Exception as exc:
            return {"ok": False, "failures": [[self.rank, _describe_error(exc)]]}, exc, []
        data_bytes = sum(o.size for o in ordered)
        outcome: dict[str, Any] = {"ok": True, "version": version, "bytes": data_bytes + size,
                                   "objects": len(ordered) + 1, "data_keys": [o.name for o in ordered]}
        if self.after_commit is not None:
            try:
                self.after_commit(WriteResult(self.name, int(outcome["bytes"]), len(ordered) + 1, version,
                                              tuple(o.name for o in ordered)))
            except Exception as exc:
                return ({"ok": False, "committed": True, "failures": [[self.rank, _describe_error(exc)]]}, exc,
                        stale)
        return outcome, None, stale

    def _discard(self) -> None:
        """Delete this rank's own data objects (after a failure; kept if an index names them)."""
        if self.write_plan is not None and self.touches_storage:
            discard(self.storage, self.write_plan)

    def _outcome_lost(self, plan: SavePlan, exc: CoordinationError) -> WriteResult:
        """The committer did not tell us the outcome: find it in storage if we may look."""
        failures = {plan.committer: f"lost before announcing the outcome ({exc})"}
        if not self.touches_storage:
            raise DistributedSaveError(
                f"multi-host save of {self.url}: the io host (rank {plan.committer}) was lost before announcing "
                f"the outcome; whether the checkpoint was committed is unknown to this rank (it does not touch "
                f"storage) - look for {index_key(self.name)}", failures) from exc
        committed = False
        try:
            index = decode_index(self.storage.get(index_key(self.name)), self.name, self.url)
            committed = any(o.name.endswith("." + plan.suffix) for o in index.objects)
        except (NotFoundError, CheckpointFormatError):
            committed = False
        except Exception as look_exc:
            log.warning("could not read the index of %s after losing the committer: %s", self.url, look_exc)
        if committed:
            raise DistributedSaveError(
                f"multi-host save of {self.url}: the checkpoint is complete and valid (its index, naming this "
                f"save's data, was committed), but the committing host (rank {plan.committer}) was lost "
                f"right after: {exc}", failures, committed=True) from exc
        self._discard()
        raise DistributedSaveError(_failure_message(self.url, failures), failures) from exc
