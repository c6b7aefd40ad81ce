"""``DCPCheckpoint``: torch.distributed.checkpoint state that ``CheckpointManager`` manages like a ``Checkpoint``.

It holds what ``dcp.save`` takes - a dict of ``Stateful`` objects and plain state
(``{"model": ModelWrapper(model), "optim": OptimizerWrapper(model, optim), "step": 7}``) -
and implements the ``ManagedCheckpoint`` protocol, so numbering, ``max_to_keep``,
``keep_checkpoint_every_n_hours``, the state file with its compare-and-swap ownership and
fencing, ``latest_checkpoint``, ``restore_or_initialize``, async saves and the
``PreemptionCheckpointHandler`` all work unchanged. Every save is a ``dcp.save`` (or
``dcp.async_save``) through ``cloudckpt.dcp.StorageWriter``; every restore a ``dcp.load``
through ``StorageReader``, in place: ``Stateful`` objects get ``load_state_dict``, other
values are replaced in the dict.

Many processes: construct it on every rank, with the job's ``TorchCoordinator`` (the
default one in a multi-process job). DCP's own collectives then run on the coordinator's
gloo group - never on the training loop's group, which the preemption handler and the
training step use from the main thread while an async save runs in the background.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from cloudckpt.coordination import Coordinator, TorchCoordinator, default_coordinator, io_rank
from cloudckpt.dcp.reader import StorageReader
from cloudckpt.dcp.writer import ManagedSave, StorageWriter
from cloudckpt.errors import AfterCommitError, ConcurrentWriterError, DistributedSaveError
from cloudckpt.options import CheckpointOptions
from cloudckpt.restoring.io_host import shared_index
from cloudckpt.restoring.load_status import SAVE_COUNTER
from cloudckpt.saving.async_save import AsyncSaver
from cloudckpt.saving.collective import describe_error, failure_message
from cloudckpt.saving.committer import AfterCommit
from cloudckpt.storage import CheckpointPath, Location, resolve
from cloudckpt.trackable import Variable


def save_error(exc: BaseException, url: str, coordinator: Coordinator) -> BaseException:
    """What a ``DCPCheckpoint`` save raises for DCP's ``CheckpointException`` ``exc``.

    ``ConcurrentWriterError`` as itself (a fenced writer sees the same error everywhere);
    on one process, the cause itself (a missing bucket is a ``BucketNotFoundError``); on
    many, one ``DistributedSaveError`` naming each failed rank's cause.
    """
    if not isinstance(exc, CheckpointException):
        if coordinator.world_size == 1 or isinstance(exc, (ConcurrentWriterError, DistributedSaveError)):
            return exc
        # A collective of DCP's own failed here (another rank died or timed out).
        text = describe_error(exc)
        return DistributedSaveError(f"DCP save of {url} failed on rank {coordinator.rank}: {text}",
                                    {coordinator.rank: text})
    causes = {rank: cause for rank, (cause, _trace) in exc.failures.items()}
    for cause in causes.values():
        if isinstance(cause, ConcurrentWriterError):
            return cause
    committed = any(isinstance(c, AfterCommitError) for c in causes.values())
    if coordinator.world_size == 1 and len(causes) == 1:
        cause = next(iter(causes.values()))
        return cause.__cause__ if isinstance(cause, AfterCommitError) and cause.__cause__ is not None else cause
    failures = {rank: describe_error(cause) for rank, cause in causes.items()}
    if committed:
        return AfterCommitError(f"DCP save of {url}: the checkpoint is complete and valid (its index was "
                                f"committed), but the bookkeeping after the commit failed - "
                                f"{'; '.join(f'rank {r}: {c}' for r, c in sorted(failures.items()))}", failures)
    return DistributedSaveError(failure_message(url, failures), failures)


@contextlib.contextmanager
def _translated(url: str, coordinator: Coordinator) -> Iterator[None]:
    """Raise ``save_error``'s translation of what the body raises (chained to it)."""
    try:
        yield
    except (CheckpointException, Exception) as exc:
        translated = save_error(exc, url, coordinator)
        if translated is exc:
            raise
        try:
            raise translated from exc
        finally:
            del translated  # kept in this frame's locals, it would close a cycle through its own traceback


def load_error(exc: BaseException, coordinator: Coordinator) -> BaseException:
    """The cause of a failed ``dcp.load``: this rank's own, else the lowest failed rank's."""
    if not isinstance(exc, CheckpointException):
        return exc
    causes = {rank: cause for rank, (cause, _trace) in exc.failures.items()}
    return causes.get(coordinator.rank) or causes[min(causes)]


class DCPCheckpoint:
    """DCP state (a dict of ``Stateful`` objects and values, as ``dcp.save`` takes) for ``CheckpointManager``.

    Args:
        app_state: the dict DCP saves and loads in place (kept, not copied: a load replaces
            its non-``Stateful`` values).
        coordinator: the job's coordinator (default ``default_coordinator()``); with several
            processes it must be a ``TorchCoordinator``, whose group DCP's collectives use.
        planner: a DCP ``SavePlanner`` (default: DCP's ``DefaultSavePlanner``).
        load_planner: a DCP ``LoadPlanner`` (default: DCP's ``DefaultLoadPlanner``).

    ``save_counter`` numbers the manager's checkpoints; it is stored in the index (the
    ``dcp`` field) and restored with the state, so a resumed job continues the numbering.
    """

    def __init__(self, app_state: dict[str, Any], *, coordinator: Coordinator | None = None,
                 planner: SavePlanner | None = None, load_planner: LoadPlanner | None = None) -> None:
        if not isinstance(app_state, dict):
            raise TypeError(f"DCPCheckpoint app_state must be a dict (as dcp.save takes), got "
                            f"{type(app_state).__name__}")
        coordinator = coordinator if coordinator is not None else default_coordinator()
        if coordinator.world_size > 1 and not isinstance(coordinator, TorchCoordinator):
            raise ValueError("a multi-process DCPCheckpoint needs a TorchCoordinator (DCP's collectives run on "
                             "its process group)")
        self.app_state = app_state
        self._coordinator = coordinator
        self._planner = planner
        self._load_planner = load_planner
        self._save_counter = Variable(0, name=SAVE_COUNTER, dtype=np.int64)
        self._saver: AsyncSaver | None = None

    @property
    def save_counter(self) -> Variable:
        """An int64 ``Variable``: how many saves numbered this state (restored with it)."""
        return self._save_counter

    @property
    def coordinator(self) -> Coordinator:
        return self._coordinator

    def _dcp_args(self) -> dict[str, Any]:
        """How DCP runs its collectives: on the coordinator's group, or not at all on one process."""
        if self._coordinator.world_size == 1:
            return {"no_dist": True}
        assert isinstance(self._coordinator, TorchCoordinator)
        return {"process_group": self._coordinator.group}

    # ------------------------------------------------------------------ saving
    def write(self, path: CheckpointPath, options: CheckpointOptions | None = None) -> str:
        """``dcp.save`` the state to exactly ``path`` (replacing a checkpoint there atomically); return it."""
        return self._write_managed(path, options)

    def _write_managed(self, path: CheckpointPath, options: CheckpointOptions | None = None, *,
                       after_commit: AfterCommit | None = None, metadata: Mapping[str, Any] | None = None,
                       base: str | None = None) -> str:
        """One save (``ManagedCheckpoint``): ``after_commit`` runs on the committing rank right after the
        commit; ``base`` (a manager's incremental save) is a checkpoint whose identical pieces are referenced."""
        options = options or CheckpointOptions()
        if io_rank(options, self._coordinator) is not None:
            raise ValueError("experimental_io_device is not supported for DCP checkpoints: every rank writes its own "
                             "shards")
        self.sync()
        location = resolve(path)
        shown = location.url if isinstance(path, Location) else os.fspath(path)
        writer = StorageWriter(location, overwrite=True, coordinator=self._coordinator)
        writer._managed = ManagedSave(after_commit, metadata, int(self._save_counter), session_held=True, base=base)
        coord = self._coordinator
        if not options.enable_async:
            with coord.session(), _translated(location.url, coord):
                dcp_save(self.app_state, storage_writer=writer, planner=self._planner, **self._dcp_args())
            options.run_write_callbacks(shown)
            return shown
        coord.begin_session()
        try:
            with _translated(location.url, coord):
                started = dcp_async_save(self.app_state, storage_writer=writer, planner=self._planner,
                                         **self._dcp_args())
        except BaseException:
            coord.end_session()
            raise
        upload = started.upload_completion if isinstance(started, AsyncSaveResponse) \
            else started

        def finish() -> None:
            try:
                with _translated(location.url, coord):
                    upload.result()
            finally:
                coord.end_session()
            options.run_write_callbacks(shown)

        if self._saver is None:
            self._saver = AsyncSaver()
        self._saver.submit(shown, finish)
        return shown

    def sync(self, timeout: float | None = None) -> None:
        """Wait for an async save; re-raise its failure (``SaveError``; ``ConcurrentWriterError`` as is)."""
        if self._saver is not None:
            self._saver.wait(timeout)

    def close(self) -> None:
        """Finish an in-flight save (re-raising its failure) and stop the background worker."""
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.close()

    def __enter__(self) -> DCPCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ restoring
    def restore(self, save_path: CheckpointPath | None, options: CheckpointOptions | None = None) -> None:
        """``dcp.load`` the checkpoint at ``save_path`` into ``app_state`` (every rank together).

        ``None`` restores nothing (as ``Checkpoint.restore(None)``). Raises what the load
        failed with on this rank (or the lowest failed rank): ``CheckpointNotFoundError``,
        ``ChecksumError``, ``CheckpointFormatError``, ...
        """
        if save_path is None:
            return
        self.sync()
        location = resolve(save_path)
        # Every rank loads together here: one index read for the job, broadcast (issue 16).
        shared = shared_index(self._coordinator, location, 0) if self._coordinator.world_size > 1 else None
        reader = StorageReader(location, index=shared)
        with self._coordinator.session():
            try:
                dcp_load(self.app_state, storage_reader=reader, planner=self._load_planner, **self._dcp_args())
            except CheckpointException as exc:
                raise (reader.metadata_error or load_error(exc, self._coordinator)) from exc
        self._save_counter.assign(reader.save_counter or 0)


if TYPE_CHECKING:  # DCPCheckpoint is what CheckpointManager manages (checked by mypy, costs nothing at run time)
    from cloudckpt.manager import ManagedCheckpoint

    _managed: ManagedCheckpoint = DCPCheckpoint({})
