"""``Checkpoint``: TensorFlow's ``tf.train.Checkpoint`` for numpy and PyTorch state.

It groups the objects to save (keyword arguments, or a root ``Trackable`` and extra
keyword arguments), numbers saves with ``save_counter``, and composes the layers below:
``object_graph.collect`` -> ``saving`` (plan, upload, commit, on a coordinator) for saves,
``restoring`` (``io_host`` for the shared index, ``assign``) for restores, ``saving.async_save``
for background saves, ``format.state_file`` for the directory's ``checkpoint`` file that
``latest_checkpoint`` reads. Paths are resolved once, here, into a ``Location``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from cloudckpt.coordination import Coordinator, LocalCoordinator, default_coordinator, io_rank
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import CheckpointIndex, state_file
from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat, load_any_index
from cloudckpt.object_graph import Collected, ShardedLeaf, classify, collect
from cloudckpt.options import CheckpointOptions
from cloudckpt.restoring.assign import RestoreSession
from cloudckpt.restoring.io_host import ReadRelay, shared_index
from cloudckpt.restoring.load_status import SAVE_COUNTER, CheckpointLoadStatus, InitializationOnlyStatus
from cloudckpt.saving import AfterCommit, CommittedWrite, SaveRun, SaveSettings, announce_failure
from cloudckpt.saving.async_save import AsyncSaver, SaveStats
from cloudckpt.storage import CheckpointPath, Location, Storage, resolve
from cloudckpt.storage.throttle import TransferStats
from cloudckpt.trackable import Trackable, Variable

log = logging.getLogger("cloudckpt.checkpoint")


def _check_trackable(name: str, value: object) -> None:
    """TensorFlow's check: a checkpoint's dependencies must hold state.

    A bare scalar is refused (as ``tf.train.Checkpoint`` refuses a Python int): it could
    not be restored into anything the caller holds. Wrap it in a ``Variable``.
    """
    found = classify(value)
    if found is None or not found.stateful:
        raise ValueError(
            f"`Checkpoint` was expecting {name} to be a trackable object (a Trackable, Variable, numpy "
            f"array, torch tensor, container, or an object with state_dict()), got {value!r}. "
            f"Wrap plain Python values in cloudckpt.Variable.")


#: Where each foreign format's reading is documented (named by the error that refuses to restore one).
_FOREIGN_DOCS = {IndexFormat.TENSORFLOW: "docs/tensorflow-import.md", IndexFormat.TORCH_DCP: "docs/dcp.md",
                 IndexFormat.ORBAX: "docs/orbax-import.md"}

class Checkpoint(Trackable):
    """Groups trackable objects, saving and restoring them (``tf.train.Checkpoint``).

    Args:
        root: optional root ``Trackable``; its dependencies become the checkpoint's.
        **kwargs: more dependencies, by name. With a root, a name the root already uses
            for a different object is an error.

    Raises:
        ValueError: a non-trackable root or keyword argument, a keyword argument that
            shadows a ``Checkpoint`` attribute (such as ``save_counter``), or one that
            clashes with ``root.<name>``.
    """

    _root: Trackable | None
    _save_counter: Variable
    _saver: AsyncSaver | None
    _last_stats: SaveStats | None
    #: Set by ``DTensorCheckpoint``: every save runs the multi-host protocol on it.
    _coordinator: Coordinator | None = None

    def __init__(self, root: Trackable | None = None, **kwargs: Any) -> None:
        if root is not None and not isinstance(root, Trackable):
            raise ValueError(f"`Checkpoint` was expecting root to be a trackable object (an object derived "
                             f"from `Trackable`), got {root!r}.")
        root_deps = dict(root._checkpoint_dependencies()) if root is not None else {}
        for name, value in sorted(kwargs.items()):
            if name.startswith("_") or hasattr(Checkpoint, name):
                raise ValueError(f"`Checkpoint` keyword argument {name!r} is reserved (it would shadow "
                                 f"Checkpoint.{name.lstrip('_')}); choose another name")
            _check_trackable(name, value)
            if name in root_deps and root_deps[name] is not value:
                raise ValueError(f"Cannot create a Checkpoint with keyword argument {name} if root.{name} "
                                 f"already exists.")
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_save_counter", Variable(0, name=SAVE_COUNTER, dtype=np.int64))
        object.__setattr__(self, "_saver", None)
        object.__setattr__(self, "_last_stats", None)
        for name, value in sorted(kwargs.items()):
            if name not in root_deps:
                setattr(self, name, value)

    # ------------------------------------------------------------------ graph
    def _checkpoint_dependencies(self) -> Iterator[tuple[str, Any]]:
        """``save_counter``, the root's dependencies, then this object's public attributes."""
        yield SAVE_COUNTER, self._save_counter
        seen = {SAVE_COUNTER}
        if self._root is not None:
            for name, value in self._root._checkpoint_dependencies():
                if name not in seen:
                    seen.add(name)
                    yield name, value
        for name, value in sorted(vars(self).items()):
            if not name.startswith("_") and name not in seen:
                yield name, value

    def _attribute_owner(self, name: str) -> Trackable:
        """Attributes the root provides live on the root, where later assignments go too."""
        if self._root is not None and name not in vars(self):
            return self._root
        return self

    @property
    def save_counter(self) -> Variable:
        """An int64 ``Variable``: 0 until the first ``save``, incremented by each ``save``."""
        return self._save_counter

    @property
    def last_save_stats(self) -> SaveStats | None:
        """What the most recent finished save did (bytes, objects, seconds, blocked seconds)."""
        return self._last_stats

    @property
    def coordinator(self) -> Coordinator | None:
        """The coordinator every save of this checkpoint runs on (``DTensorCheckpoint``), or
        ``None`` for a plain one, whose saves are single-host unless it holds sharded arrays."""
        return self._coordinator

    # ------------------------------------------------------------------ saving
    def save(self, file_prefix: CheckpointPath, options: CheckpointOptions | None = None) -> str:
        """Increment ``save_counter`` and write ``<file_prefix>-<save_counter>``; return that path.

        Like TensorFlow's, it also records the new checkpoint in the directory's state
        file (``<dir>/checkpoint``), so ``latest_checkpoint(dir)`` finds it.
        ``file_prefix`` is a path, a URL, or a ``Location`` (a storage opened in code).
        """
        self._saver_wait()
        prefix = resolve(file_prefix)
        if self._coordinator is None:  # one host: refuse a manager's directory before writing anything
            state_file.check_unmanaged(prefix.storage, prefix.name)
        self._save_counter.assign_add(1)
        number = int(self._save_counter)
        location = prefix.sibling(f"{prefix.name}-{number}")
        return self._write_to(location, f"{_shown(file_prefix)}-{number}", options, hashes=False,
                              after_commit=lambda written: state_file.record_checkpoint(location.storage, written.name))

    def write(self, file_prefix: CheckpointPath, options: CheckpointOptions | None = None) -> str:
        """Write exactly ``file_prefix`` (no numbering, no state file); return the path.

        An existing checkpoint there is replaced atomically; its data objects are
        deleted only after the new index is committed.
        """
        return self._write_to(resolve(file_prefix), _shown(file_prefix), options, hashes=False)

    def _write_managed(self, path: CheckpointPath, options: CheckpointOptions | None = None, *,
                       after_commit: AfterCommit | None = None, metadata: Mapping[str, Any] | None = None,
                       base: str | None = None) -> str:
        """``write`` with a hook run after the commit and user metadata in the index.

        The interface ``CheckpointManager`` builds on. ``after_commit(written)`` runs on
        the committing host's thread that committed (the background worker for async
        saves), before the write callbacks; its failure is the save's failure, and it
        alone may decide to undo the commit (``written`` names the index version and data objects).

        Every save runs one pipeline (``cloudckpt.saving``) on a coordinator - the
        checkpoint's own on many hosts, a ``LocalCoordinator`` on one. Async: the caller
        is blocked for the snapshot into the staging buffer and for uploading what does
        not fit it (``early``); the rest of the protocol runs on the background worker.

        ``base`` (a manager's incremental save): a committed checkpoint in the same directory
        whose unchanged pieces the new one references instead of uploading again.
        """
        return self._write_to(resolve(path), _shown(path), options, after_commit=after_commit, metadata=metadata,
                              base=base)

    def _write_to(self, location: Location, shown: str, options: CheckpointOptions | None, *,
                  after_commit: AfterCommit | None = None, metadata: Mapping[str, Any] | None = None,
                  base: str | None = None, hashes: bool = True) -> str:
        """Save to ``location`` (``shown`` is the path as the caller wrote it, returned and logged)."""
        self._saver_wait()
        started = time.monotonic()
        traffic = location.storage.transfer_stats()
        try:
            entries = collect(self)
        except Exception as exc:
            if self._coordinator is None:
                raise
            raise announce_failure(self._coordinator, location.url, exc) from exc
        coordinator = self._coordinator_for(entries)
        settings = SaveSettings.of(options, coordinator)
        staged, early, staged_bytes = entries, set[str](), 0
        if settings.asynchronous:
            staged, early, staged_bytes = self._async_saver().staging.stage(entries, settings.staging_budget)
        run = SaveRun(coordinator, location, staged, metadata=metadata, io_rank=settings.io_rank,
                      after_commit=after_commit, aggregate_errors=self._coordinator is not None or None, base=base,
                      hashes=hashes)
        run.start(early)
        if not settings.asynchronous or run.must_finish_now:
            result = run.finish()
            self._complete(shown, result, settings, started, time.monotonic() - started, False, staged_bytes,
                           run.early_bytes, location.storage, traffic)
            return shown
        blocked = time.monotonic() - started

        def job() -> None:
            self._complete(shown, run.finish(), settings, started, blocked, True, staged_bytes, run.early_bytes,
                           location.storage, traffic)

        self._async_saver().submit(shown, job)
        return shown

    def _coordinator_for(self, entries: Mapping[str, Collected]) -> Coordinator:
        """The coordinator of this save: a ``DTensorCheckpoint``'s, else the single-host one.

        A plain ``Checkpoint`` holding sharded arrays (a ``DTensor`` in a ``state_dict``)
        uses the process-wide default, since its shards may be spread over the job's processes.
        """
        if self._coordinator is not None:
            return self._coordinator
        if any(isinstance(e, ShardedLeaf) for e in entries.values()):
            return default_coordinator()
        return LocalCoordinator()

    def _complete(self, path: str, result: CommittedWrite, settings: SaveSettings, started: float, blocked: float,
                  asynchronous: bool, staged_bytes: int, early_bytes: int, storage: Storage,
                  traffic: TransferStats) -> None:
        """After the commit and its bookkeeping: stats and log line, then the write callbacks."""
        now = storage.transfer_stats()
        stats = SaveStats(path, result.bytes, result.objects, time.monotonic() - started, blocked,
                          asynchronous, staged_bytes, early_bytes, result.reused_bytes,
                          throttled=now.throttled - traffic.throttled, retries=now.retries - traffic.retries,
                          concurrency=now.concurrency)
        object.__setattr__(self, "_last_stats", stats)
        log.info("saved %s: %d bytes in %d objects%s, %.3f s (caller blocked %.3f s%s)%s", path, stats.bytes,
                 stats.objects, f", {stats.reused_bytes} unchanged bytes reused" if stats.reused_bytes else "",
                 stats.seconds, stats.blocked_seconds, ", async" if asynchronous else "",
                 f"; the store throttled {stats.throttled} request(s), {stats.retries} retried, "
                 f"{stats.concurrency} in flight now" if stats.throttled or stats.retries else "")
        settings.options.run_write_callbacks(path)

    def reserve_async_staging(self, options: CheckpointOptions | None = None) -> int:
        """Allocate (and fault in) the staging buffer async saves will copy into, now; return its bytes.

        Why: the first async save otherwise pays for first-touching freshly allocated memory
        on the caller's thread (on this kind of VM about as long again as the copy itself).
        Call it once the state exists - ``CheckpointManager(options=CheckpointOptions(
        enable_async=True))`` does - and the first save blocks only for the copy. It costs the
        buffer's memory (the state, up to ``async_staging_budget``) from now on.
        """
        budget = (options or CheckpointOptions(enable_async=True)).async_staging_budget
        return self._async_saver().staging.reserve_for(collect(self), budget)

    def _async_saver(self) -> AsyncSaver:
        saver = self._saver
        if saver is None:
            saver = AsyncSaver()
            object.__setattr__(self, "_saver", saver)
        return saver

    def _saver_wait(self, timeout: float | None = None) -> None:
        if self._saver is not None:
            self._saver.wait(timeout)

    def sync(self, timeout: float | None = None) -> None:
        """Wait for an in-flight async save; re-raise its failure as ``SaveError``.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
            SaveError: the background save (or one of its write callbacks) failed.
        """
        self._saver_wait(timeout)

    def close(self) -> None:
        """Finish in-flight saves (re-raising a failure) and stop the background worker."""
        saver = self._saver
        if saver is not None:
            object.__setattr__(self, "_saver", None)
            saver.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ restoring
    def restore(self, save_path: CheckpointPath | None, options: CheckpointOptions | None = None
                ) -> CheckpointLoadStatus | InitializationOnlyStatus:
        """Restore from ``save_path`` (expecting ``save_counter``); ``None`` -> initialise only.

        Values for objects that do not exist yet are restored when they are attached.
        On many hosts, ``options.experimental_io_device`` makes that host alone read the
        checkpoint and send every host its bytes (every rank calls ``restore`` together).

        Raises:
            CheckpointNotFoundError: nothing committed at ``save_path``.
            CheckpointMismatchError: a stored shape/dtype/type does not fit its object;
                nothing was restored.
            ChecksumError: stored bytes are corrupt.
        """
        return self._restore(save_path, options, expect_save_counter=True)

    def read(self, save_path: CheckpointPath | None, options: CheckpointOptions | None = None
             ) -> CheckpointLoadStatus | InitializationOnlyStatus:
        """Like ``restore``, but does not expect ``save_counter`` (for paths made by ``write``)."""
        return self._restore(save_path, options, expect_save_counter=False)

    def _restore(self, save_path: CheckpointPath | None, options: CheckpointOptions | None, *,
                 expect_save_counter: bool) -> CheckpointLoadStatus | InitializationOnlyStatus:
        if save_path is None:
            return InitializationOnlyStatus()
        self._saver_wait()
        location = resolve(save_path)
        relay = self._read_relay(options)
        if self._coordinator is not None and self._coordinator.world_size > 1:
            # One index read per job: the io host (or rank 0) reads and validates it, all get it.
            reader = relay.io_rank if relay is not None else 0
            index = shared_index(self._coordinator, location, reader, self._load_own_index)
        else:
            index = self._load_own_index(location)
        session = RestoreSession(location.storage, index, relay)
        for owner in (self, self._root):
            if owner is not None:
                owner._clear_deferred()  # values of an earlier restore must not leak into this one
        session.restore("", self, None)
        session.ranges = None  # later (deferred) restorations are one host's business: no collective
        return CheckpointLoadStatus(session, self, expect_save_counter=expect_save_counter)

    @staticmethod
    def _load_own_index(location: Location) -> CheckpointIndex:
        """A cloudckpt index; another framework's checkpoint is named as what it is (restoring into
        objects through a foreign object graph is not supported - ``load_checkpoint`` reads it, and
        ``cloudckpt cp`` converts it)."""
        found = load_any_index(location.storage, location.name)
        if isinstance(found, ForeignCheckpoint):
            raise CheckpointFormatError(
                f"{location.url} is a {found.format.value}: Checkpoint.restore/read restore cloudckpt checkpoints "
                "only; read its tensors with cloudckpt.load_checkpoint(path).get_tensor(key) or "
                f"cloudckpt.load_variable(path, key), or convert it with `cloudckpt cp` "
                f"({_FOREIGN_DOCS[found.format]})")
        return found

    def _read_relay(self, options: CheckpointOptions | None) -> ReadRelay | None:
        """The io host's relay when a multi-host restore routes its reads through one host."""
        if options is None or self._coordinator is None or self._coordinator.world_size == 1:
            return None
        target = io_rank(options, self._coordinator)
        return None if target is None else ReadRelay(self._coordinator, target)


def _shown(path: CheckpointPath) -> str:
    """A checkpoint path as the caller wrote it (what ``save``/``write`` return)."""
    return path.url if isinstance(path, Location) else os.fspath(path)
