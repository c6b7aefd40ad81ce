"""``CheckpointManager`` and ``latest_checkpoint``: TensorFlow's semantics, safe on object stores.

What TensorFlow does, kept exactly: numbering from ``save_counter``, ``max_to_keep`` /
``keep_checkpoint_every_n_hours`` retention, ``checkpoint_interval`` skipping, state that
survives across instances through ``<directory>/checkpoint``.

What this does better:

- ``latest_checkpoint`` returns only *committed* checkpoints (it HEADs each index, newest
  first), where TensorFlow trusts the state file blindly.
- Ownership: reading never writes. The first save *claims* the directory (adopts the
  state, writes it back with this manager's writer token by compare-and-swap); every
  later save compares-and-swaps against the version this manager last wrote. A newer
  job therefore fences an older one (the VM that outlived its preemption) at the older
  one's next save, which raises ``ConcurrentWriterError`` and deletes only what it just
  wrote.
- Deleting a checkpoint removes its index first, then exactly the data objects that
  index names - never "everything under the prefix".
- One state-file write per save (TensorFlow writes it twice).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from cloudckpt.crashpoints import crash_point
from cloudckpt.distributed.coordinator import Coordinator
from cloudckpt.distributed.options import io_rank
from cloudckpt.errors import (
    CheckpointFormatError,
    CheckpointStateError,
    ConcurrentWriterError,
    NotFoundError,
    PreconditionError,
)
from cloudckpt.format import INDEX_SUFFIX, decode_index, index_key
from cloudckpt.leftovers import find_leftovers, remove_leftovers
from cloudckpt.options import CheckpointOptions
from cloudckpt.reader import storage_for_directory
from cloudckpt.retention import BestN, LatestN, PreserveEveryNHours, RetentionPolicy
from cloudckpt.state_file import STATE_KEY, CheckpointState, read_state, write_state
from cloudckpt.storage import ObjectMeta, Storage, join_url

log = logging.getLogger("cloudckpt.manager")

_CLAIM_ATTEMPTS = 20
#: Default age before a crashed save's leftovers are removed: far longer than any save
#: should take, so a zombie VM still uploading is never robbed of its bytes mid-save.
DEFAULT_LEFTOVER_MIN_AGE = timedelta(hours=1)


def _as_number(value: Any, what: str) -> int:
    """An int from an int, a numpy scalar, a ``Variable`` or a tensor (TF accepts all)."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an integer or hold one, got {type(value).__name__}") from None
    return number


def _as_age(value: float | timedelta | None) -> timedelta | None:
    if value is None:
        return None
    age = value if isinstance(value, timedelta) else timedelta(seconds=float(value))
    if age < timedelta(0):
        raise ValueError(f"leftover_min_age must not be negative, got {value!r}")
    return age


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """The newest *committed* checkpoint in ``checkpoint_dir`` (full path), or ``None``.

    Walks the state file's list from newest to oldest and returns the first whose index
    exists (warning about listed checkpoints whose index is gone). Lists the directory
    only when there is no state file, it is unreadable, or it names no checkpoint at all
    (a manager claimed the directory and was killed before its first save was recorded):
    then the highest-numbered ``<name>-<N>.index`` wins.
    """
    storage = storage_for_directory(checkpoint_dir)
    return _latest(storage, os.fspath(checkpoint_dir))


def _latest(storage: Storage, directory: str) -> str | None:
    try:
        found = read_state(storage)
    except CheckpointStateError as exc:
        log.warning("%s; finding the latest checkpoint by listing instead", exc)
        found = None
    except PreconditionError:
        found = read_state(storage)  # replaced mid-read: once more is enough to see a stable file
    if found is None or not (found[0].model_checkpoint_path or found[0].all_model_checkpoint_paths):
        name = _latest_by_listing(storage)
        return join_url(directory, name) if name else None
    state = found[0]
    candidates = list(reversed(state.all_model_checkpoint_paths))
    if state.model_checkpoint_path and state.model_checkpoint_path not in candidates:
        candidates.insert(0, state.model_checkpoint_path)
    for name in candidates:
        relative = _relative_name(name, directory)
        if storage.exists(index_key(relative)):
            return join_url(directory, relative)
        log.warning("state file lists %s but its index is gone; skipping it", join_url(directory, relative))
    return None


def _relative_name(name: str, directory: str) -> str:
    """State files written by TensorFlow may hold absolute paths; we store relative ones."""
    prefix = directory.rstrip("/") + "/"
    return name[len(prefix):] if name.startswith(prefix) else name


def _latest_by_listing(storage: Storage) -> str | None:
    best: tuple[int, float, str] | None = None
    for meta in storage.list(""):
        if "/" in meta.key or not meta.key.endswith(INDEX_SUFFIX):
            continue
        name = meta.key[: -len(INDEX_SUFFIX)]
        stem, _, number = name.rpartition("-")
        if not stem or not number.isdigit():
            continue
        stamp = meta.last_modified.timestamp() if meta.last_modified else 0.0
        key = (int(number), stamp, name)
        if best is None or key > best:
            best = key
    return best[2] if best else None


class CheckpointManager:
    """Keeps a bounded set of checkpoints in a directory (``tf.train.CheckpointManager``).

    Args:
        checkpoint: the ``Checkpoint`` to save and restore.
        directory: where checkpoints go: a path, PathLike, or a URL (``s3://``, ``gs://``, ...).
        max_to_keep: how many recent checkpoints stay active; ``None`` keeps all.
        keep_checkpoint_every_n_hours: of the evicted ones, keep one every N hours forever.
        checkpoint_name: the prefix of each checkpoint (``ckpt`` -> ``ckpt-7``).
        step_counter: with ``checkpoint_interval``, the step variable saves are spaced on.
        checkpoint_interval: minimum steps between saves.
        init_fn: called by ``restore_or_initialize`` when there is nothing to restore.
        keep_best: optional ``BestN`` rule (metric from ``save(metadata=...)``) on top.
        storage: an already-open ``Storage`` for ``directory`` (tests, custom clients).
        options: default ``CheckpointOptions`` for ``save``. In a multi-host job its
            ``experimental_io_device`` also picks the host that reads and writes the
            state file (the one that commits), since it may be the only one with access.
        leftover_min_age: the first save removes what crashed saves left in ``directory``
            (data objects no index names, temporary chunks, stale multipart uploads) when
            older than this by the store's clock (seconds or a ``timedelta``); it must exceed
            the longest save, since anything younger may still be uploading. ``None``
            disables the cleanup. See ``cloudckpt.leftovers``.

    Many hosts: with a ``DTensorCheckpoint`` the manager is a collective object - every
    rank constructs it and calls ``save``, ``restore_or_initialize`` and ``sync`` together,
    as SPMD training does anyway. One host (rank 0, or the io host) alone reads and writes
    the state file, claims the directory and deletes; it broadcasts what it found, so every
    rank restores the same checkpoint and agrees on the active list. ``step_counter`` must
    advance identically on every rank (it decides the interval locally, without a
    collective, so that a skipped save never waits on an in-flight upload).
    """

    def __init__(self, checkpoint: Any, directory: str | os.PathLike[str], max_to_keep: int | None,
                 keep_checkpoint_every_n_hours: float | None = None, checkpoint_name: str = "ckpt",
                 step_counter: Any = None, checkpoint_interval: int | None = None,
                 init_fn: Callable[[], Any] | None = None, *, keep_best: BestN | None = None,
                 storage: Storage | None = None, options: CheckpointOptions | None = None,
                 leftover_min_age: float | timedelta | None = DEFAULT_LEFTOVER_MIN_AGE) -> None:
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep <= 0):
            raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
        if checkpoint_interval is not None:
            if step_counter is None:
                raise ValueError("step_counter must be set when checkpoint_interval is set")
            if not isinstance(checkpoint_interval, int) or checkpoint_interval < 0:
                raise ValueError(f"checkpoint_interval must be a non-negative int, got {checkpoint_interval!r}")
        if not checkpoint_name or "/" in checkpoint_name:
            raise ValueError(f"checkpoint_name must be a non-empty name without '/', got {checkpoint_name!r}")
        self._leftover_min_age = _as_age(leftover_min_age)
        self._checkpoint = checkpoint
        self._directory = os.fspath(directory)
        self._storage = storage or storage_for_directory(self._directory)
        self._name = checkpoint_name
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._init_fn = init_fn
        self._policy = RetentionPolicy(
            latest=LatestN(max_to_keep),
            preserve=PreserveEveryNHours(keep_checkpoint_every_n_hours) if keep_checkpoint_every_n_hours else None,
            best=keep_best)
        self._token = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._state_meta: ObjectMeta | None = None
        self._claimed = False
        self._fenced: ConcurrentWriterError | None = None
        self._last_checkpoint_step: int | None = None
        self._active: OrderedDict[str, float] = OrderedDict()
        self._preserved: dict[str, float] = {}
        self._metrics: dict[str, float] = {}
        self._latest: str | None = None
        self._warned_unreadable = False
        self._deleting: list[str] = []
        self._options = options
        self._coordinator: Coordinator | None = getattr(checkpoint, "_coordinator", None)
        if self._coordinator is not None and self._coordinator.world_size == 1:
            self._coordinator = None
        self._owner = self._committer(options)
        self._adopt(self._read_state_for_adoption() if self._owns_storage else None, now=time.time())
        self._share_state()

    # ------------------------------------------------------------------ properties
    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint(self) -> Any:
        return self._checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        return self._checkpoint_interval

    @property
    def checkpoints(self) -> list[str]:
        """Active checkpoints, oldest first (full paths)."""
        with self._lock:
            return [join_url(self._directory, name) for name in self._active]

    @property
    def latest_checkpoint(self) -> str | None:
        """The newest committed checkpoint (HEAD-checked), or ``None``.

        On a multi-host manager's other ranks: the owner's answer as of the last
        collective call, without touching storage.
        """
        with self._lock:
            names = list(reversed(self._active))
            if self._latest and self._latest not in names:
                names.insert(0, self._latest)
        if not self._owns_storage:
            return join_url(self._directory, names[0]) if names else None
        if not names:  # nothing recorded: the same listing fallback as latest_checkpoint()
            listed = _latest_by_listing(self._storage)
            return join_url(self._directory, listed) if listed else None
        for name in names:
            if self._storage.exists(index_key(name)):
                return join_url(self._directory, name)
            log.warning("checkpoint %s is listed but its index is gone; skipping it",
                        join_url(self._directory, name))
        return None

    @property
    def preserved_checkpoints(self) -> list[str]:
        """Checkpoints kept forever by ``keep_checkpoint_every_n_hours`` (full paths)."""
        with self._lock:
            return [join_url(self._directory, name) for name in self._preserved]

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
            mine = self._snapshot() if self._owns_storage else None
        theirs = self._coordinator.broadcast_object(mine, src=self._owner)
        if not self._owns_storage:
            with self._lock:
                self._active = OrderedDict((name, float(stamp)) for name, stamp in theirs["active"])
                self._preserved = {k: float(v) for k, v in theirs["preserved"].items()}
                self._metrics = {k: float(v) for k, v in theirs["metrics"].items()}
                self._latest = theirs["latest"]
                self._last_preserved = float(theirs["last_preserved"])

    def _snapshot(self) -> dict[str, Any]:
        return {"active": [[name, stamp] for name, stamp in self._active.items()], "preserved": dict(self._preserved),
                "metrics": dict(self._metrics), "latest": self._latest, "last_preserved": self._last_preserved}

    def _ensure_ownership(self) -> None:
        """Claim the directory (first save) or check we still own it; every rank learns the outcome."""
        failure: str | None = None
        if self._owns_storage:
            try:
                if not self._claimed:
                    self._claim()
                else:
                    self._check_still_owner()
            except ConcurrentWriterError as exc:
                if self._coordinator is None:
                    raise
                failure = str(exc)
        if self._coordinator is not None:
            failure = self._coordinator.broadcast_object(failure, src=self._owner)
            if failure is not None:
                raise ConcurrentWriterError(failure)

    # ------------------------------------------------------------------ state adoption
    def _read_state_for_adoption(self) -> tuple[CheckpointState, ObjectMeta] | None:
        try:
            return read_state(self._storage)
        except CheckpointStateError as exc:
            if not self._warned_unreadable:  # once per manager: the claim re-reads the same file
                self._warned_unreadable = True
                warnings.warn(f"{exc}; starting with no managed checkpoints (none will be deleted)",
                              RuntimeWarning, stacklevel=3)
            return None
        except PreconditionError:
            return read_state(self._storage)

    def _adopt(self, found: tuple[CheckpointState, ObjectMeta] | None, now: float) -> None:
        """TensorFlow's recovery rules: which listed checkpoints become active again."""
        self._active.clear()
        if found is None:
            self._last_preserved = now - 1.0
            self._latest = None
            self._deleting = []
            return
        state = found[0]
        self._latest = _relative_name(state.model_checkpoint_path, self._directory) \
            if state.model_checkpoint_path else None
        last = state.last_preserved_timestamp if state.last_preserved_timestamp is not None else now - 1.0
        if now < last:
            log.warning("time.time() is %.1f seconds behind the last preserved checkpoint's timestamp; "
                        "clamping it to now (did the clock go backwards?)", last - now)
            last = now
        self._last_preserved = last
        paths = [_relative_name(p, self._directory) for p in state.all_model_checkpoint_paths]
        stamps = state.all_model_checkpoint_timestamps or [last] * len(paths)
        for name, stamp in zip(paths, stamps, strict=True):
            stamp = min(stamp, now)
            if stamp > self._last_preserved:
                self._active[name] = stamp
        self._preserved = dict(state.preserved)
        self._metrics = {k: v for k, v in state.metrics.items() if k in self._active}
        kept = {*self._active, *self._preserved, self._latest}
        self._deleting = [name for name in (_relative_name(p, self._directory) for p in state.deleting)
                          if name not in kept]

    def _state(self) -> CheckpointState:
        return CheckpointState(
            model_checkpoint_path=self._latest,
            all_model_checkpoint_paths=list(self._active),
            all_model_checkpoint_timestamps=list(self._active.values()),
            last_preserved_timestamp=self._last_preserved,
            writer=self._token,
            preserved=dict(self._preserved),
            metrics=dict(self._metrics),
            deleting=list(self._deleting),
        )

    # ------------------------------------------------------------------ ownership
    def _claim(self) -> None:
        """Re-read, adopt, and write the state back with our token (compare-and-swap)."""
        for _ in range(_CLAIM_ATTEMPTS):
            found = self._read_state_for_adoption()
            now = time.time()
            with self._lock:
                if found is not None:  # with no state, keep what the constructor decided
                    self._adopt(found, now)
                expected = found[1] if found else self._garbage_state_meta()
                try:
                    self._state_meta = write_state(self._storage, self._state(), expected)
                except PreconditionError:
                    continue
                self._claimed = True
                log.info("claimed %s for writer %s", self._directory, self._token[:8])
            self._finish_deletions()
            self._remove_leftovers()
            return
        raise ConcurrentWriterError(f"could not claim {self._directory}: its state file kept changing")

    def _finish_deletions(self) -> None:
        """Delete evicted checkpoints the state file lists as being deleted.

        The state write that evicts a checkpoint also records it as ``deleting``, so one
        killed before (or during) its deletion is finished by the next save or the next
        owner's claim, instead of staying on the store unlisted forever. A failure is
        logged and retried at the next save - the commit already stands.
        """
        for name in list(self._deleting):
            try:
                delete_checkpoint(self._storage, name)
            except Exception as exc:
                log.warning("could not delete evicted checkpoint %s (will retry at the next save): %s",
                            join_url(self._directory, name), exc)
                continue
            with self._lock:
                if name in self._deleting:
                    self._deleting.remove(name)

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

    def _garbage_state_meta(self) -> ObjectMeta | None:
        """When the state file is unreadable we replace it, but only that exact version."""
        try:
            return self._storage.head(STATE_KEY)
        except NotFoundError:
            return None

    def _check_still_owner(self) -> None:
        """Cheap pre-upload check: has anyone replaced the state file since our last write?"""
        if self._fenced is not None:
            raise self._fenced
        try:
            current = self._storage.head(STATE_KEY)
        except NotFoundError:
            current = None
        if current is None or self._state_meta is None or current.version != self._state_meta.version:
            self._fence(f"another writer took over {self._directory} (its state file changed since this "
                        "manager's last save); this manager will not save again")

    def _fence(self, message: str) -> None:
        self._fenced = ConcurrentWriterError(message)
        raise self._fenced

    # ------------------------------------------------------------------ save
    def save(self, checkpoint_number: Any = None, check_interval: bool = True, options: Any = None,
             metadata: Mapping[str, Any] | None = None) -> str | None:
        """Save a checkpoint (``write`` semantics) and apply retention; see the class docs.

        Returns:
            The new checkpoint's path, or ``None`` when ``checkpoint_interval`` skipped it.

        Raises:
            ConcurrentWriterError: another manager claimed this directory since.
            ValueError: on many hosts, ``options`` route I/O through another host than the
                one keeping this manager's state file (checked before anything changes).
        """
        options = options if options is not None else self._options
        if self._committer(options) != self._owner:
            raise ValueError(f"options.experimental_io_device={options.experimental_io_device!r} names another host "
                             f"than the one this manager's state file is kept by (rank {self._owner}); pass the "
                             "same io_device as CheckpointManager(options=...)")
        if self._checkpoint_interval is not None:
            step = _as_number(self._step_counter, "step_counter")
            if self._last_checkpoint_step is not None:
                if step == self._last_checkpoint_step:
                    return None
                if check_interval and step < self._last_checkpoint_step + self._checkpoint_interval:
                    return None
            self._last_checkpoint_step = step
        self.sync()
        self._ensure_ownership()
        counter = self._checkpoint.save_counter
        counter.assign_add(1)
        number = _as_number(counter if checkpoint_number is None else checkpoint_number, "checkpoint_number")
        name = f"{self._name}-{number}"
        path = join_url(self._directory, name)
        metric = None
        if self._policy.best is not None and metadata is not None and self._policy.best.metric in metadata:
            metric = float(metadata[self._policy.best.metric])
        written_path: str = self._checkpoint._write_managed(
            path, options=options, metadata=metadata,
            after_commit=lambda written: self._after_commit(name, written, metric))
        if options is None or not options.enable_async:
            self._share_state()  # async saves share theirs at the next sync()
        return written_path

    def _after_commit(self, name: str, written: Any, metric: float | None) -> None:
        """Bookkeeping once the index is committed: one CAS state write, then deletions.

        Runs on the caller's thread for synchronous saves and on the background worker
        for async ones, so the state file never names a checkpoint that is not committed.
        ``written`` is what the writer committed (index version, data keys), used to undo
        exactly our own write if we turn out to be fenced.
        """
        with self._lock:
            timestamp = time.time()
            self._active.pop(name, None)
            self._active[name] = timestamp
            self._preserved.pop(name, None)
            if name in self._deleting:  # re-saved before its old version was deleted: keep it
                self._deleting.remove(name)
            if metric is not None:
                self._metrics[name] = metric
            self._latest = name
            sweep = self._policy.sweep(self._active, self._last_preserved, self._metrics)
            self._last_preserved = sweep.last_preserved_timestamp
            self._preserved.update(sweep.preserved)
            for dropped in [*sweep.preserved, *sweep.deleted]:
                self._metrics.pop(dropped, None)
            self._deleting.extend(gone for gone in sweep.deleted if gone not in self._deleting)
            try:
                self._state_meta = write_state(self._storage, self._state(), self._state_meta)
            except PreconditionError:
                self._undo_write(name, written)
                self._fence(f"another writer took over {self._directory} while {name} was being saved; "
                            f"this save was rolled back and this manager will not save again")
        crash_point("after_state_write")
        self._finish_deletions()

    def _undo_write(self, name: str, written: Any) -> None:
        """Remove what this save wrote - and nothing another writer may have replaced it with."""
        try:
            current = self._storage.head(index_key(name))
            if current.version == getattr(written, "index_version", None):
                self._storage.delete(index_key(name))
        except NotFoundError:
            pass
        self._storage.delete(list(getattr(written, "data_keys", ())))

    # ------------------------------------------------------------------ restore
    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint and return its path, or run ``init_fn`` and return ``None``."""
        latest: str | None
        if self._coordinator is not None:
            self.sync()  # no collective of ours may overlap a background save's
            latest = self._coordinator.broadcast_object(self.latest_checkpoint, src=self._owner)
        else:
            latest = self.latest_checkpoint
        if latest is not None:
            self._checkpoint.restore(latest, options=self._options)  # io_device: that host reads for all
            if self._step_counter is not None and self._checkpoint_interval is not None:
                self._last_checkpoint_step = _as_number(self._step_counter, "step_counter")
            return latest
        if self._init_fn is not None:
            self._init_fn()
        return None

    def sync(self, timeout: float | None = None) -> None:
        """Wait for in-flight async saves; re-raise their failure. Collective on many hosts."""
        sync = getattr(self._checkpoint, "sync", None)
        if sync is not None:
            sync(timeout) if timeout is not None else sync()
        self._share_state()

    def close(self) -> None:
        self.sync()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def delete_checkpoint(storage: Storage, name: str) -> None:
    """Index first (the checkpoint disappears atomically), then the data objects it names.

    Never "everything under the prefix": a concurrent re-save of the same number has
    data objects with other (write-unique) names that must survive.
    """
    key = index_key(name)
    try:
        raw = storage.get(key)
    except NotFoundError:
        return
    try:
        objects = [obj.name for obj in decode_index(raw, name, storage.url_for(key)).objects]
    except CheckpointFormatError as exc:
        log.warning("not deleting data objects of %s: its index is unreadable (%s)", storage.url_for(key), exc)
        objects = []
    storage.delete(key)
    crash_point("after_delete_index")
    storage.delete(objects)
    crash_point("after_delete_data")
    log.info("deleted checkpoint %s (%d data objects)", storage.url_for(name), len(objects))
