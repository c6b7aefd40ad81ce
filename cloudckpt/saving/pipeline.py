"""The save protocol, one host or many: describe -> plan -> write (or send) -> wait -> commit -> outcome.

One code path serves a single process and a job of thousands: a single process is the
one-rank case, run on a ``LocalCoordinator`` whose collectives return at once. Call order,
on every rank (collectives marked *)::

    start        committer HEADs the index; every rank describes its pieces
      *all_gather  descriptions; every rank computes the same UploadPlan (plan.py) - names,
                   suffix and who writes which replica are agreed before any byte moves
      early        each rank uploads the objects holding its early pieces (an async save's
                   state beyond its staging budget) from live memory
    finish       (on the caller's thread, or an async save's worker)
      write        io_device unset: each rank uploads the rest of its data objects
                   io_device=K: *transfer of every other rank's pieces to K; K uploads all
      *poll        short all_gathers of "done?" while uploads run: a slow upload is fine,
                   a host that stops answering fails everyone within the group's timeout
      *gather      each rank's chunks (object, byte range, CRC32C) or failure, to the committer
      commit       only if no rank failed: the committer's ``Committer`` (committer.py, the
                   step the DCP writer drives too) decodes the index back, PUTs it (the
                   commit point), then runs ``after_commit`` (state file, retention)
      *broadcast   the outcome; every rank returns it or raises the same error

No index is written unless every rank finished its data, so a failed rank never leaves
a half checkpoint visible; each rank deletes the data objects it started uploading. If
the outcome cannot be learnt (the committer died after the commit), a rank that can see
storage looks at the index before it says anything: an index naming this write's
objects means the checkpoint is complete, and the error says so.

Errors: a plain single-host save raises the exception that caused it (a missing bucket is
a ``BucketNotFoundError``); a collective save (``aggregate_errors``: a ``DTensorCheckpoint``,
or any job of several ranks) raises one ``DistributedSaveError`` on every rank listing each
rank's cause, even on a one-process mesh, so code written for many hosts handles one error
type. ``ConcurrentWriterError`` is raised as itself everywhere.

Why one ~420-line module: it is the save protocol in call order, on one class; split,
the order above would be scattered over files. The steps it calls live in their own
modules (``settings``, ``plan``, ``objects``, ``collective``, ``committer``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt._testhooks import crash_point
from cloudckpt.coordination import Coordinator
from cloudckpt.errors import (
    AfterCommitError,
    CheckpointFormatError,
    ConcurrentWriterError,
    CoordinationError,
    DistributedSaveError,
    StorageError,
)
from cloudckpt.format import dtype_name, index_key, parse_dtype
from cloudckpt.format.index_fetch import read_index
from cloudckpt.leaves.copier import DeviceArray, to_host_now
from cloudckpt.object_graph import ArrayLeaf, Collected, ShardedLeaf
from cloudckpt.saving.collective import (
    Outcome,
    Report,
    describe_error,
    failure_message,
    start_polled,
    wait_for_every_rank,
)
from cloudckpt.saving.commit import assemble_index, number_objects
from cloudckpt.saving.committer import AfterCommit, CommittedWrite, Committer
from cloudckpt.saving.objects import (
    BaseCheckpoint,
    ObjectPlan,
    Piece,
    PieceId,
    Uploaded,
    UploadLog,
    new_suffix,
    pieces_of,
    plan_objects,
    shared_base,
    spreads,
    upload,
)
from cloudckpt.saving.plan import DescribeFailure, Description, PieceDescription, UploadPlan, make_plan
from cloudckpt.storage import Location

log = logging.getLogger("cloudckpt.saving")


def _arrays(entries: Mapping[str, Collected]) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path, item in entries.items():
        if isinstance(item, ArrayLeaf):
            out[path] = (dtype_name(item.array.dtype), tuple(item.array.shape))
        elif isinstance(item, ShardedLeaf):
            out[path] = (dtype_name(item.dtype), item.shape)
    return out


def save(coordinator: Coordinator, location: Location, entries: Mapping[str, Collected], *,
         metadata: Mapping[str, Any] | None = None, io_rank: int | None = None,
         after_commit: AfterCommit | None = None, aggregate_errors: bool | None = None,
         base: str | None = None) -> CommittedWrite:
    """Run the whole protocol on this rank (every rank calls it with its own entries)."""
    run = SaveRun(coordinator, location, entries, metadata=metadata, io_rank=io_rank, after_commit=after_commit,
                  aggregate_errors=aggregate_errors, base=base)
    run.start()
    return run.finish()


class SaveRun:
    """One rank's part of one save: ``start()`` (plan, early uploads), then ``finish()`` (the rest).

    ``start`` runs on the caller's thread; ``finish`` on it too, or later on an async
    save's worker. The coordinator's session is held from ``start`` until ``finish``
    returns, so two saves of one process never interleave their collectives.

    ``base`` names a committed checkpoint in the same directory (an incremental save: the
    manager's previous one) whose identical pieces are referenced instead of uploaded. The
    committer reads its index once and broadcasts it; if it is unreadable the save is full.
    """

    def __init__(self, coordinator: Coordinator, location: Location, entries: Mapping[str, Collected], *,
                 metadata: Mapping[str, Any] | None = None, io_rank: int | None = None,
                 after_commit: AfterCommit | None = None, aggregate_errors: bool | None = None,
                 base: str | None = None, hashes: bool = True) -> None:
        self.coord = coordinator
        #: Record content hashes (a managed save, which a later incremental one may build on).
        self.hashes = hashes
        #: Raise ``DistributedSaveError`` (default: on jobs of several ranks) instead of the cause.
        self.aggregate = coordinator.world_size > 1 if aggregate_errors is None else aggregate_errors
        self.rank = coordinator.rank
        self.storage = location.storage
        self.name = location.name
        self.url = location.url
        self.entries = entries
        self.metadata = metadata
        self.io_rank = io_rank
        self.committer = 0 if io_rank is None else io_rank
        self.touches_storage = io_rank is None or io_rank == self.rank
        #: The commit step (saving.committer), which the committer rank drives; every rank discards through it.
        self._commit_step = Committer(self.storage, self.name, rank=self.rank,
                                      after_commit=after_commit if self.rank == self.committer else None)
        self.log = UploadLog()
        self._base_name = base
        self._base: BaseCheckpoint | None = None
        self._pieces = pieces_of(entries)
        self._plan: UploadPlan | None = None
        self._objects: ObjectPlan | None = None
        self._early = Uploaded()
        self._early_bytes = 0
        self._local_error: BaseException | None = None
        self._early_paths: frozenset[str] = frozenset()
        self._in_session = False

    # ------------------------------------------------------------------ public
    @property
    def early_bytes(self) -> int:
        """Bytes this rank uploaded in ``start`` (from live memory, while the caller waited)."""
        return self._early_bytes

    @property
    def must_finish_now(self) -> bool:
        """Whether ``finish`` must run before the caller returns (its early part failed, or this
        rank's early pieces must travel to the io host from live memory)."""
        return self._local_error is not None or (self.io_rank is not None and bool(self._early_paths))

    def start(self, early: Collection[str] = ()) -> None:
        """Agree on the plan with every rank and upload this rank's early pieces.

        Raises:
            DistributedSaveError / the cause: a rank could not describe its state, or the
                hosts' states do not make one checkpoint (nothing was uploaded).
        """
        self._early_paths = frozenset(early)
        self.coord.begin_session()
        self._in_session = True
        try:
            self._plan = self._agree_on_plan()
            self._base = self._collective(lambda: shared_base(self.coord, self.storage, self._base_name,
                                                              root=self.committer, url=self.url))
            self._objects = self._own_objects(self._plan)
            self._upload_early()
        except BaseException:
            self._end_session()
            self._discard()  # Ctrl-C during the early upload: nothing it started may stay
            raise

    def finish(self) -> CommittedWrite:
        """Upload the rest, wait for every rank, commit, and return what was committed."""
        try:
            assert self._plan is not None, "SaveRun.finish() before start()"
            return self._finish(self._plan)
        finally:
            self._end_session()

    # ------------------------------------------------------------------ phases
    def _agree_on_plan(self) -> UploadPlan:
        mine: Description | DescribeFailure
        try:
            if self.rank == self.committer:
                # HEAD before anyone uploads: a rival commit during our upload then fails ours.
                self._commit_step.look()
            mine = Description(
                url=self.url, suffix=new_suffix(), max_objects=self.storage.config.max_concurrency,
                arrays=_arrays(self.entries), early=self._early_paths,
                pieces=tuple(PieceDescription(p, tuple(a.shape), int(a.nbytes)) for p, a in self._pieces.items()))
        except Exception as exc:
            if not self.aggregate:
                raise
            mine = DescribeFailure(describe_error(exc))
        descriptions = self._collective(lambda: self.coord.all_gather_object(mine))
        failed = {r: d.error for r, d in enumerate(descriptions) if isinstance(d, DescribeFailure)}
        if failed:
            raise DistributedSaveError(failure_message(self.url, failed), failed)
        try:
            return make_plan(descriptions, committer=self.committer, io_rank=self.io_rank)
        except ValueError as exc:
            if not self.aggregate:
                raise
            raise DistributedSaveError(f"multi-host save of {self.url} was not started: {exc}",
                                       {self.rank: str(exc)}) from exc

    def _own_objects(self, plan: UploadPlan) -> ObjectPlan:
        """This rank's data objects (pieces still to be received by an io host are placeholders)."""
        data = self._pieces if plan.io_rank is None else self._receive_buffers(plan)
        return plan_objects(self.name, data, plan.groups[self.rank], suffix=plan.suffix,
                            spread=spreads(self.storage, plan.total_objects),
                            index_offset=plan.offsets[self.rank], total_objects=plan.total_objects)

    def _receive_buffers(self, plan: UploadPlan) -> dict[PieceId, Piece]:
        """On the io host: its own pieces, and empty buffers for the ones the others send."""
        if self.rank != plan.io_rank:
            return {}
        dtypes = {path: parse_dtype(dtype) for path, (dtype, _) in _arrays(self.entries).items()}
        out: dict[PieceId, Piece] = {}
        for piece, writer in plan.writer.items():
            info = plan.pieces[piece]
            out[piece] = (self._pieces[piece] if writer == self.rank
                          else np.empty(info.nbytes, dtype=np.uint8).view(dtypes[piece[0]]).reshape(info.shape))
        return out

    def _upload_early(self) -> None:
        assert self._plan is not None and self._objects is not None
        count = self._plan.early[self.rank]
        if not count:
            return
        try:
            self._early = upload(self.storage, self._objects, range(count), self.log, self._base, hashes=self.hashes)
            self._early_bytes = sum(o.size for o in self._early.objects)
        except Exception as exc:
            self._local_error = exc  # still take part in the protocol, or the other ranks would hang

    def _finish(self, plan: UploadPlan) -> CommittedWrite:
        stored = Uploaded()
        local_error = self._local_error
        try:
            future: Future[Uploaded]
            if local_error is None:
                try:
                    self._transfer(plan)
                    future = self._start_upload(plan)
                except CoordinationError:
                    raise
                except Exception as exc:  # still take part in the polling, or the others would hang
                    future = _failed(exc)
            else:
                future = _failed(local_error)
            if self.coord.world_size > 1:
                self._poll(future)
            stored.merge(self._early)
            stored.merge(future.result())
            crash_point("after_data_upload")
        except CoordinationError as exc:
            self._discard()
            raise DistributedSaveError(f"multi-host save of {self.url} failed: {exc}", {self.rank: str(exc)}) from exc
        except Exception as exc:
            local_error = exc
        except BaseException:  # Ctrl-C / SystemExit: a PUT may have landed before it; remove what was started
            self._discard()
            raise
        report = self._report(local_error, stored)
        reports = self._collective(lambda: self.coord.gather_object(report, dst=self.committer))
        outcome: Outcome | None = None
        commit_error: BaseException | None = None
        if self.rank == self.committer:
            assert reports is not None
            outcome, commit_error = self._commit(reports)
        try:
            outcome = self.coord.broadcast_object(outcome, src=self.committer)
        except CoordinationError as exc:
            return self._outcome_lost(plan, exc)
        assert outcome is not None
        if not outcome.ok:
            self._raise_failure(plan, outcome, local_error, commit_error)
        if self.rank == self.committer:
            self._commit_step.delete_replaced()
        return CommittedWrite(self.name, outcome.bytes, outcome.objects, outcome.version, outcome.data_keys,
                           outcome.reused_bytes)

    def _raise_failure(self, plan: UploadPlan, outcome: Outcome, local_error: BaseException | None,
                       commit_error: BaseException | None) -> None:
        if not outcome.committed:
            self._discard()
        cause = local_error or commit_error
        if not self.aggregate and cause is not None:
            raise cause
        if outcome.committed:
            if commit_error is not None:
                raise commit_error  # the committer's own bookkeeping error, as a single host raises it
            raise AfterCommitError(
                f"multi-host save of {self.url}: the checkpoint is complete and valid (its index was committed), "
                f"but the committing host's bookkeeping after the commit failed - rank {plan.committer}: "
                f"{outcome.failures.get(plan.committer)}", outcome.failures)
        if outcome.concurrent is not None:
            if isinstance(commit_error, ConcurrentWriterError):
                raise commit_error
            raise ConcurrentWriterError(outcome.concurrent)
        raise DistributedSaveError(failure_message(self.url, outcome.failures),
                                   outcome.failures) from (local_error or commit_error)

    def _collective(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except CoordinationError as exc:
            self._discard()
            raise DistributedSaveError(f"multi-host save of {self.url} failed: {exc}", {self.rank: str(exc)}) from exc

    def _transfer(self, plan: UploadPlan) -> None:
        """io_device: every other rank sends its pieces to the io host, which receives them in place."""
        if plan.io_rank is None:
            return
        if self.rank != plan.io_rank:
            outgoing = [to_host_now(self._pieces[p]).reshape(-1).view(np.uint8) for p in plan.sent_by(self.rank)]
            self.coord.transfer(plan.io_rank, [o for o in outgoing if o.nbytes], {})
            return
        assert self._objects is not None
        incoming: dict[int, list[NDArray[np.uint8]]] = {}
        for piece, writer in plan.writer.items():
            buffer = self._objects.pieces[piece]
            if writer != self.rank and buffer.nbytes:
                assert not isinstance(buffer, DeviceArray)  # a receive buffer: host memory
                incoming.setdefault(writer, []).append(buffer.reshape(-1).view(np.uint8))
        self.coord.transfer(self.rank, [], incoming)

    def _start_upload(self, plan: UploadPlan) -> Future[Uploaded]:
        """Upload this rank's remaining objects (on a worker thread when other ranks must be polled)."""
        assert self._objects is not None
        which = range(plan.early[self.rank], len(self._objects.objects))
        objects = self._objects
        return start_polled(lambda: upload(self.storage, objects, which, self.log, self._base, hashes=self.hashes),
                            background=self.coord.world_size > 1 and bool(which), name="cloudckpt-save-upload")

    def _poll(self, future: Future[Any]) -> None:
        wait_for_every_rank(self.coord, future)

    def _report(self, error: BaseException | None, stored: Uploaded) -> Report:
        if error is not None:
            return Report(error=describe_error(error))
        return Report(objects=tuple(stored.objects), pieces=dict(stored.pieces), reused=dict(stored.reused))

    def _commit(self, reports: list[Report]) -> tuple[Outcome, BaseException | None]:
        """On the committer: commit if every rank stored its data; the outcome to broadcast, and the
        error this rank raises (a bookkeeping failure as its own cause, as a single host raises it)."""
        failures = {r: rep.error for r, rep in enumerate(reports) if rep.error is not None}
        if failures:
            return Outcome(ok=False, failures=failures), None
        written = tuple(o for rep in reports for o in rep.objects)
        ordered, chunks = number_objects(written, {name: size for rep in reports for name, size in rep.reused.items()},
                                         {piece: p for rep in reports for piece, p in rep.pieces.items()})
        try:
            index = assemble_index(self.name, self.entries, ordered, chunks, self.metadata)
            result = self._commit_step.commit(index, written)
        except ConcurrentWriterError as exc:
            return Outcome(ok=False, failures={self.rank: describe_error(exc)}, concurrent=str(exc)), exc
        except AfterCommitError as exc:
            cause = exc.__cause__ or exc
            return Outcome(ok=False, committed=True, failures={self.rank: describe_error(cause)}), cause
        except Exception as exc:
            return Outcome(ok=False, failures={self.rank: describe_error(exc)}), exc
        return (Outcome(ok=True, version=result.index_version, bytes=result.bytes, objects=result.objects,
                        data_keys=result.data_keys, reused_bytes=result.reused_bytes), None)

    def _discard(self) -> None:
        """Delete this rank's own data objects (after a failure; kept if an index names them)."""
        if self.touches_storage:
            self._commit_step.discard(self.log.snapshot())

    def _end_session(self) -> None:
        if self._in_session:
            self._in_session = False
            self.coord.end_session()

    def _outcome_lost(self, plan: UploadPlan, exc: CoordinationError) -> CommittedWrite:
        """The committer did not tell us the outcome: find it in storage if we may look."""
        failures = {plan.committer: f"lost before announcing the outcome ({exc})"}
        if not self.touches_storage:
            raise DistributedSaveError(
                f"multi-host save of {self.url}: the io host (rank {plan.committer}) was lost before announcing "
                f"the outcome; whether the checkpoint was committed is unknown to this rank (it does not touch "
                f"storage) - look for {index_key(self.name)}", failures) from exc
        committed = False
        try:
            index = read_index(self.storage, self.name)
            committed = index is not None and any(o.name.endswith("." + plan.suffix) for o in index.objects)
        except (CheckpointFormatError, StorageError) as look_exc:
            log.warning("could not read the index of %s after losing the committer: %s", self.url, look_exc)
        if committed:
            raise AfterCommitError(
                f"multi-host save of {self.url}: the checkpoint is complete and valid (its index, naming this "
                f"save's data, was committed), but the committing host (rank {plan.committer}) was lost "
                f"right after: {exc}", failures) from exc
        self._discard()
        raise DistributedSaveError(failure_message(self.url, failures), failures) from exc


def _failed(exc: BaseException) -> Future[Uploaded]:
    future: Future[Uploaded] = Future()
    future.set_exception(exc)
    return future
