"""``CheckpointManager`` and ``latest_checkpoint``: TensorFlow's semantics, safe on object stores.

What TensorFlow does, kept exactly: numbering from ``save_counter``, ``max_to_keep`` /
``keep_checkpoint_every_n_hours`` retention, ``checkpoint_interval`` skipping, state that
survives across instances through ``<directory>/checkpoint``.

What this does better:

- ``latest_checkpoint`` returns only *committed* checkpoints (it HEADs each index, newest
  first), where TensorFlow trusts the state file blindly.
- Ownership (``ownership``): reading never writes; the first save claims the directory and
  a newer job fences an older one, which deletes only what it just wrote.
- Deleting a checkpoint removes its index first, then exactly the data objects that
  index names - never "everything under the prefix" (``directory.delete_checkpoint``).
- One state-file write per save (TensorFlow writes it twice).

This class is the TensorFlow surface and the glue: the managed set lives in
``managed_set``, ownership in ``ownership``, directory queries in ``directory``.

Why one ~475-line module: it is the one class TensorFlow's API defines, and what is
left in it is that API's order of steps; everything it delegates has a module of its own
(``contract``, ``managed_set``, ``retention``, ``ownership``, ``directory``, ``resume``,
``cleanup``, and the local tier's ``tiers/``).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from cloudckpt._testhooks import crash_point
from cloudckpt.checkpoint import Checkpoint
from cloudckpt.coordination import Coordinator, io_rank
from cloudckpt.errors import CheckpointStateError, ConcurrentWriterError, PreconditionError
from cloudckpt.format import index_key
from cloudckpt.format.state_file import CheckpointState
from cloudckpt.manager.cleanup import find_leftovers, remove_leftovers
from cloudckpt.manager.contract import ManagedCheckpoint, as_age, as_number
from cloudckpt.manager.directory import (
    delete_checkpoint,
    first_committed,
    latest_by_listing,
    shown_directory,
)
from cloudckpt.manager.managed_set import ManagedSet
from cloudckpt.manager.ownership import DirectoryOwnership
from cloudckpt.manager.resume import restore_newest_intact
from cloudckpt.manager.retention import BestN, RetentionPolicy, manager_policy, metric_key
from cloudckpt.manager.tiers import LocalTier, TierRunner, step_of
from cloudckpt.options import CheckpointOptions
from cloudckpt.saving import CommittedWrite
from cloudckpt.storage import Directory, Location, Storage, join_url, resolve_directory

log = logging.getLogger("cloudckpt.manager")

#: Default age before a crashed save's leftovers are removed: far longer than any save
#: should take, so a zombie VM still uploading is never robbed of its bytes mid-save.
DEFAULT_LEFTOVER_MIN_AGE = timedelta(hours=1)


class CheckpointManager:
    """Keeps a bounded set of checkpoints in a directory (``tf.train.CheckpointManager``).

    Args:
        checkpoint: the ``Checkpoint`` to save and restore (anything implementing ``ManagedCheckpoint``).
        directory: where checkpoints go: a path, PathLike, a URL (``s3://``, ``gs://``, ...) or a ``Storage``.
        max_to_keep: how many recent checkpoints stay active; ``None`` keeps all.
        keep_checkpoint_every_n_hours: of the evicted ones, keep one every N hours forever.
        checkpoint_name: the prefix of each checkpoint (``ckpt`` -> ``ckpt-7``).
        step_counter: with ``checkpoint_interval``, the step variable saves are spaced on.
        checkpoint_interval: minimum steps between saves.
        init_fn: called by ``restore_or_initialize`` when there is nothing to restore.
        keep_best: optional ``BestN`` rule (metric from ``save(metadata=...)``): the best are kept too.
        preservation: a retention policy (``cloudckpt.manager.retention``: ``LatestN``, ``EveryNHours``,
            ``BestN``, ``AnyOf``) instead of the three above, which it excludes (``max_to_keep=None``).
        storage: an already-open ``Storage`` for ``directory`` (custom clients, credentials,
            transfer tuning); every object of the directory - checkpoints and state file - goes
            through it. ``directory`` may also be a ``Storage`` itself.
        options: default ``CheckpointOptions`` for ``save``. In a multi-host job its
            ``experimental_io_device`` also picks the host that reads and writes the
            state file (the one that commits), since it may be the only one with access.
            With ``enable_async``, the async staging buffer is allocated here, once
            (``Checkpoint.reserve_async_staging``), not during the first save.
        leftover_min_age: the first save removes what crashed saves left in ``directory``
            (data objects no index names, temporary chunks, stale multipart uploads) when
            older than this by the store's clock (seconds or a ``timedelta``); it must exceed
            the longest save, since anything younger may still be uploading. ``None``
            disables the cleanup. See ``cloudckpt.manager.cleanup``.
        incremental: each save references the bytes of pieces unchanged since this manager's
            latest checkpoint instead of uploading them again (identity: equal XXH3-128 hash,
            key, dtype, box and size). On by default; ``save(incremental=False)`` writes one
            save in full. Retention and cleanup delete only objects no kept checkpoint names.
        local_tier: a ``LocalTier`` (host-local directory, replicas on peer hosts, its own
            ``max_to_keep``): ``save(tier="local")`` saves there, and ``restore_or_initialize``
            restores the newest verified step of both tiers (``cloudckpt.manager.tiers``, docs/tiers.md).

    Many hosts: with a ``DTensorCheckpoint`` the manager is a collective object - every
    rank constructs it and calls ``save``, ``restore_or_initialize`` and ``sync`` together,
    as SPMD training does anyway. One host (rank 0, or the io host) alone reads and writes
    the state file, claims the directory and deletes; it broadcasts what it found, so every
    rank restores the same checkpoint and agrees on the active list. ``step_counter`` must
    advance identically on every rank (it decides the interval locally, without a
    collective, so that a skipped save never waits on an in-flight upload).
    """

    def __init__(self, checkpoint: ManagedCheckpoint, directory: Directory, max_to_keep: int | None,
                 keep_checkpoint_every_n_hours: float | None = None, checkpoint_name: str = "ckpt",
                 step_counter: Any = None, checkpoint_interval: int | None = None,
                 init_fn: Callable[[], Any] | None = None, *, keep_best: BestN | None = None,
                 preservation: RetentionPolicy | None = None,
                 storage: Storage | None = None, options: CheckpointOptions | None = None,
                 leftover_min_age: float | timedelta | None = DEFAULT_LEFTOVER_MIN_AGE,
                 incremental: bool = True, local_tier: LocalTier | None = None) -> None:
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep <= 0):
            raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
        if checkpoint_interval is not None:
            if step_counter is None:
                raise ValueError("step_counter must be set when checkpoint_interval is set")
            if not isinstance(checkpoint_interval, int) or checkpoint_interval < 0:
                raise ValueError(f"checkpoint_interval must be a non-negative int, got {checkpoint_interval!r}")
        if not checkpoint_name or "/" in checkpoint_name:
            raise ValueError(f"checkpoint_name must be a non-empty name without '/', got {checkpoint_name!r}")
        self._leftover_min_age = as_age(leftover_min_age)
        self._incremental = bool(incremental)
        self._checkpoint = checkpoint
        self._directory = shown_directory(directory)
        self._storage = storage or resolve_directory(directory)
        self._name = checkpoint_name
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._init_fn = init_fn
        self._policy = manager_policy(max_to_keep, keep_checkpoint_every_n_hours, keep_best, preservation)
        self._lock = threading.RLock()
        self._warned_unreadable = False
        self._ownership = DirectoryOwnership(self._storage, on_garbled=self._warn_garbled)
        self._last_checkpoint_step: int | None = None
        #: Checkpoints a resume found damaged (until a save of ours replaces them), and the one it
        #: restored instead: the claim re-reads the state file, which may still list them.
        self._damaged: set[str] = set()
        self._restored: str | None = None
        self._options = options
        coordinator = checkpoint.coordinator
        self._coordinator = coordinator if coordinator is not None and coordinator.world_size > 1 else None
        self._owner = self._committer(options)
        self._tier = TierRunner(local_tier, self._coordinator) if local_tier is not None else None
        found = self._ownership.read() if self._owns_storage else None
        self._managed = ManagedSet.adopt(found[0] if found else None, self._storage.url, time.time())
        self._share_state()
        if options is not None and options.enable_async and isinstance(checkpoint, Checkpoint):
            checkpoint.reserve_async_staging(options)  # so the first save blocks only for the copy

    # ------------------------------------------------------------------ properties
    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint(self) -> ManagedCheckpoint:
        return self._checkpoint

    @property
    def local_tier(self) -> LocalTier | None:
        """The ``LocalTier`` given, or ``None`` (docs/tiers.md)."""
        return self._tier.tier if self._tier is not None else None

    @property
    def coordinator(self) -> Coordinator | None:
        """The multi-host job's coordinator, or ``None`` when this manager runs on one host."""
        return self._coordinator

    @property
    def checkpoint_interval(self) -> int | None:
        return self._checkpoint_interval

    @property
    def checkpoints(self) -> list[str]:
        """Active checkpoints, oldest first (full paths)."""
        with self._lock:
            return [self._path(name) for name in self._managed.active]

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint (HEAD-checked), or ``None``.

        On a multi-host manager's other ranks: the owner's answer as of the last
        collective call, without touching storage.
        """
        name = self._latest_name()
        return self._path(name) if name else None

    def _latest_name(self) -> str | None:
        with self._lock:
            names = self._managed.newest_first()
        if not self._owns_storage:
            return names[0] if names else None
        return first_committed(self._storage, names) if names else latest_by_listing(self._storage)

    @property
    def preserved_checkpoints(self) -> list[str]:
        """Checkpoints kept for good by ``keep_checkpoint_every_n_hours`` / ``EveryNHours`` (full paths)."""
        with self._lock:
            return [self._path(name) for name in self._managed.preserved]

    def _path(self, name: str) -> str:
        return join_url(self._directory, name)

    def _warn_garbled(self, exc: CheckpointStateError) -> None:
        if not self._warned_unreadable:  # once per manager: the claim re-reads the same file
            self._warned_unreadable = True
            warnings.warn(f"{exc}; starting with no managed checkpoints (none will be deleted)",
                          RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ many hosts
    @property
    def _owns_storage(self) -> bool:
        """Whether this process reads/writes the state file (always, on one host)."""
        return self._coordinator is None or self._coordinator.rank == self._owner

    def _committer(self, options: CheckpointOptions | None) -> int:
        """The rank that commits a save with ``options`` (and so runs the bookkeeping)."""
        if self._coordinator is None or options is None:
            return 0
        return io_rank(options, self._coordinator) or 0

    def _share_state(self) -> None:
        """Multi-host: every rank adopts the owner's view of the directory (a collective)."""
        if self._coordinator is None:
            return
        with self._lock:
            mine = self._managed.copy() if self._owns_storage else None
        theirs: ManagedSet = self._coordinator.broadcast_object(mine, src=self._owner)
        if not self._owns_storage:
            with self._lock:
                self._managed = theirs

    def _ensure_ownership(self) -> None:
        """Claim the directory (first save) or check we still own it; every rank learns the outcome."""
        failure: str | None = None
        if self._owns_storage:
            try:
                if not self._ownership.claimed:
                    self._claim()
                else:
                    self._ownership.check_still_owner()
            except ConcurrentWriterError as exc:
                if self._coordinator is None:
                    raise
                failure = str(exc)
        if self._coordinator is not None:
            failure = self._coordinator.broadcast_object(failure, src=self._owner)
            if failure is not None:
                raise ConcurrentWriterError(failure)

    def _claim(self) -> None:
        """Claim the directory, then finish interrupted evictions and clean up crashed saves."""
        def adopt(found: CheckpointState | None) -> CheckpointState:
            with self._lock:
                if found is not None:  # with no state, keep what the constructor decided
                    self._managed = ManagedSet.adopt(found, self._storage.url, time.time())
                    if self._damaged and self._restored is not None:  # what a resume fell back past
                        self._managed.forget(self._damaged, self._restored)
                return self._managed.to_state(self._ownership.token)

        self._ownership.claim(adopt)
        self._finish_deletions()
        self._remove_leftovers()

    def _finish_deletions(self) -> None:
        """Delete evicted checkpoints the state file lists as being deleted.

        The state write that evicts a checkpoint also records it as ``deleting``, so one
        killed before (or during) its deletion is finished by the next save or the next
        owner's claim, instead of staying on the store unlisted forever. A failure is
        logged and retried at the next save - the commit already stands.
        """
        with self._lock:
            pending = list(self._managed.deleting)
        for name in pending:
            try:
                delete_checkpoint(self._storage, name)
            except Exception as exc:
                log.warning("could not delete evicted checkpoint %s (will retry at the next save): %s",
                            self._path(name), exc)
                continue
            with self._lock:
                if name in self._managed.deleting:
                    self._managed.deleting.remove(name)

    def _remove_leftovers(self) -> None:
        """Clean up after crashed saves, once, before this manager uploads anything.

        Runs before our own first upload so that not even ``leftover_min_age=0`` can touch
        bytes of ours; a failure is logged, never raised - cleanup must not stop training.
        """
        if self._leftover_min_age is None:
            return
        try:
            found = find_leftovers(self._storage, min_age=self._leftover_min_age)
            if found:
                removal = remove_leftovers(self._storage, found)
                for key, why in removal.failed:
                    log.warning("could not remove leftover %s: %s", self._storage.url_for(key), why)
        except Exception as exc:
            log.warning("could not clean up leftovers of crashed saves in %s: %s", self._directory, exc)

    # ------------------------------------------------------------------ save
    def save(self, checkpoint_number: Any = None, check_interval: bool = True,
             options: CheckpointOptions | None = None, metadata: Mapping[str, Any] | None = None, *,
             incremental: bool | None = None, tier: str | None = None, from_local: bool = False) -> str | None:
        """Save a checkpoint (``write`` semantics) and apply retention; see the class docs.

        ``incremental`` overrides the manager's setting for this save (``False``: upload
        every byte, e.g. to start a fresh chain). ``tier="local"``: save to the ``local_tier``
        (every host's directory and its replicas; never incremental; async with ``options.enable_async``,
        committed when ``sync`` returns) instead of the bucket. ``tier=None``: the bucket, or with a
        ``LocalTier(every_n_steps=..., bucket_every_n_steps=...)`` policy the tier it picks (or a skip;
        ``check_interval=False`` or ``from_local=True``: the bucket).
        ``from_local=True``: a bucket save of the newest local step, uploaded from the local copies
        in the background (no second snapshot of the live state), committed at the next ``sync``/``save``.

        Returns:
            The new checkpoint's path, or ``None`` when ``checkpoint_interval`` skipped it.

        Raises:
            ConcurrentWriterError: another manager claimed this directory since.
            ValueError: on many hosts, ``options`` route I/O through another host than the
                one keeping this manager's state file (checked before anything changes).
        """
        if tier is None:  # the automatic policy, unless the save is forced (a preemption) or from_local
            automatic = self._tier if self._tier is not None and self._tier.tier.automatic and check_interval \
                and not from_local else None
            tier = "bucket" if automatic is None else automatic.choose(
                as_number(checkpoint_number, "checkpoint_number") if checkpoint_number is not None else
                as_number(self._step_counter, "step_counter") if self._step_counter is not None else None)
            if tier is None:
                return None  # the automatic policy skips this step
        if tier not in ("bucket", "local") or (self._tier is None and tier == "local") or \
                (from_local and (self._tier is None or tier != "bucket")):
            raise ValueError(f"tier must be 'bucket' or (with CheckpointManager(local_tier=...)) 'local', got {tier!r} "
                             f"(from_local=True: a bucket save from the local tier)")
        options = options if options is not None else self._options
        if self._committer(options) != self._owner:
            assert options is not None
            raise ValueError(f"options.experimental_io_device={options.experimental_io_device!r} names another host "
                             f"than the one this manager's state file is kept by (rank {self._owner}); pass the "
                             "same io_device as CheckpointManager(options=...)")
        if self._checkpoint_interval is not None:
            step = as_number(self._step_counter, "step_counter")
            if self._last_checkpoint_step is not None:
                if step == self._last_checkpoint_step:
                    return None
                if check_interval and step < self._last_checkpoint_step + self._checkpoint_interval:
                    return None
            self._last_checkpoint_step = step
        self.sync()
        if tier == "bucket":
            self._ensure_ownership()
        if from_local and self._tier is not None and tier == "bucket":
            return self._path(self._tier.persist(self._storage, lambda n, w: self._after_commit(n, w, None),
                                                 self._owner))
        counter = self._checkpoint.save_counter
        counter.assign_add(1)
        number = as_number(counter if checkpoint_number is None else checkpoint_number, "checkpoint_number")
        name = f"{self._name}-{number}"
        if self._tier is not None and tier == "local":
            self._tier.save(self._checkpoint, name, metadata, options)
            return join_url(self._tier.url, name)
        key = metric_key(self._policy)
        metric = float(metadata[key]) if key is not None and metadata is not None and key in metadata else None
        with self._lock:
            base = self._managed.latest if (self._incremental if incremental is None else incremental) else None
        self._checkpoint._write_managed(
            Location(self._storage, name), options=options, metadata=metadata, base=base,
            after_commit=lambda written: self._after_commit(name, written, metric))
        if options is None or not options.enable_async:
            self._share_state()  # async saves share theirs at the next sync()
        return self._path(name)

    def _after_commit(self, name: str, written: CommittedWrite, metric: float | None) -> None:
        """Bookkeeping once the index is committed: one CAS state write, then deletions.

        Runs on the caller's thread for synchronous saves and on the background worker
        for async ones, so the state file never names a checkpoint that is not committed.
        ``written`` is what the writer committed (index version, data keys), used to undo
        exactly our own write if we turn out to be fenced.
        """
        with self._lock:
            self._damaged.discard(name)  # replaced by this intact save
            self._managed.record(name, time.time(), metric, self._policy)
            try:
                self._ownership.write(self._managed.to_state(self._ownership.token))
            except PreconditionError:
                self._ownership.undo_write(written)
                self._ownership.fence(f"another writer took over {self._directory} while {name} was being saved; "
                                      f"this save was rolled back and this manager will not save again")
        crash_point("after_state_write")
        self._finish_deletions()

    # ------------------------------------------------------------------ restore
    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint and return its path, or run ``init_fn`` and return ``None``."""
        candidates: list[str]
        if self._coordinator is not None:
            self.sync()  # no collective of ours may overlap a background save's
            mine = self._resume_candidates() if self._owns_storage else None  # only the owner touches storage
            candidates = self._coordinator.broadcast_object(mine, src=self._owner)
        else:
            candidates = self._resume_candidates()
        if self._tier is not None:  # a local step at least as new as the bucket's newest wins
            local = self._tier.restore(lambda where: self._checkpoint.restore(where),
                                       step_of(candidates[0]) if candidates else 0)
            if local is not None:
                if self._step_counter is not None and self._checkpoint_interval is not None:
                    self._last_checkpoint_step = as_number(self._step_counter, "step_counter")
                return join_url(self._tier.url, local)
        if candidates:
            # Through this manager's storage; with an io_device, that host reads for all. A damaged
            # latest checkpoint is skipped with a warning for the newest intact one (manager/resume.py).
            restored, damaged = restore_newest_intact(
                lambda name: self._checkpoint.restore(Location(self._storage, name), options=self._options),
                candidates, self._path, self._coordinator)
            self._forget(damaged, restored)
            if self._step_counter is not None and self._checkpoint_interval is not None:
                self._last_checkpoint_step = as_number(self._step_counter, "step_counter")
            return self._path(restored)
        if self._init_fn is not None:
            self._init_fn()
        return None

    def _resume_candidates(self) -> list[str]:
        """The latest committed checkpoint, then the other managed ones, newest first (HEAD-checked)."""
        latest = self._latest_name()
        if latest is None:
            return []
        with self._lock:
            older = [*self._managed.newest_first(),
                     *sorted(self._managed.preserved, key=self._managed.preserved.__getitem__, reverse=True)]
        rest = [n for n in dict.fromkeys(older) if n != latest]
        return [latest, *(n for n in rest if self._storage.exists(index_key(n)))]

    def _forget(self, damaged: Sequence[str], restored: str) -> None:
        """Stop managing the damaged checkpoints a resume skipped, so retention keeps the one restored.

        They stay on the store, unlisted from the next state write on (``cloudckpt ls`` and
        ``verify`` still show them); the next save's base is the checkpoint restored, and none
        of this manager's saves reuses bytes from them (the claim keeps them forgotten).
        """
        if not damaged:
            return
        with self._lock:
            self._damaged.update(damaged)
            self._restored = restored
            self._managed.forget(self._damaged, restored)

    def sync(self, timeout: float | None = None) -> None:
        """Wait for in-flight async saves; re-raise their failure. Collective on many hosts."""
        if self._tier is not None:
            self._tier.finish_local(timeout)  # an async local save commits on every host and its replicas here
            self._tier.finish_persist()  # a save(from_local=True) commits here
        self._checkpoint.sync(timeout)
        self._share_state()

    def close(self) -> None:
        self.sync()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
