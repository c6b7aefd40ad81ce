"""The local tier in a ``CheckpointManager``: save a step to every host and its replicas, resume from it.

``CheckpointManager`` keeps one ``TierRunner`` when given ``local_tier=`` and delegates
``save(tier="local")`` and the local half of ``restore_or_initialize`` to it. Everything here
is collective on a multi-host manager (all ranks call it in the same order) and is the
one-rank case on one host (a ``LocalCoordinator``: no replicas, the same steps).

A local save, in order: check this incarnation still owns every host's directory -> the
checkpoint's own pipeline writes each host's shards into its directory and commits the index
on rank 0's (``saving/committer.py``: the one commit path) -> replicate the data objects to
their holders and the index to every host -> check ownership again -> every host writes the
step's manifest (the local commit) -> local retention. A failure anywhere before the
manifests leaves a step no resume uses (``recover``).

Async (``CheckpointOptions(enable_async=True)``): the checkpoint's own async pipeline takes the
snapshot on the caller's thread; everything after it (the pipeline's write and commit, the
replication, the manifests, retention) runs on one background thread holding the
coordinator's session, and ``finish_local`` (the manager's ``sync``, and the next save or
restore) waits for it and re-raises its failure.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cloudckpt.coordination import Coordinator, LocalCoordinator
from cloudckpt.errors import ConcurrentWriterError, CoordinationError, NoIntactCheckpointError, SaveError
from cloudckpt.format import index_key
from cloudckpt.manager.contract import ManagedCheckpoint
from cloudckpt.manager.resume import restore_newest_intact
from cloudckpt.manager.tiers.config import LocalTier, replica_holders
from cloudckpt.manager.tiers.holdings import Holdings, HostDirectory, Manifest, manifest_key, step_of
from cloudckpt.manager.tiers.listing import list_local_tier
from cloudckpt.manager.tiers.persist import Persist
from cloudckpt.manager.tiers.recover import Candidate, candidates, fetch
from cloudckpt.manager.tiers.replicate import replicate
from cloudckpt.options import CheckpointOptions
from cloudckpt.saving import CommittedWrite
from cloudckpt.storage import Location, Storage
from cloudckpt.storage.checksum import crc32c_of

log = logging.getLogger("cloudckpt.manager.tiers")


@dataclass
class _Pending:
    """An async local save in flight: its step, its background thread, what it raised."""

    name: str
    thread: threading.Thread | None = None
    error: BaseException | None = None


class TierRunner:
    """One host's side of the local tier of a manager (``coordinator=None``: one host)."""

    def __init__(self, tier: LocalTier, coordinator: Coordinator | None) -> None:
        os.makedirs(os.fspath(tier.path), exist_ok=True)
        self.tier = tier
        self.coordinator = coordinator if coordinator is not None else LocalCoordinator()
        self.holdings = Holdings(HostDirectory(tier.path))
        self._token: str | None = None
        self._holders: list[list[int]] = []
        self._claimed = False
        #: Bytes this host received from its peers during the last ``restore``.
        self.received = 0
        self._persist: Persist | None = None
        self._local: _Pending | None = None
        self._calls = 0  # save() calls the automatic policy saw (its step when none is given)
        self._failed = False

    @property
    def url(self) -> str:
        """This host's local tier directory, as the user gave it."""
        return os.fspath(self.tier.path)

    def _start(self) -> str:
        """The incarnation token (rank 0's, shared) and the replica table: collective, once."""
        if self._token is None:
            token = self.coordinator.broadcast_object(uuid.uuid4().hex if self.coordinator.rank == 0 else None)
            domains = [str(d) for d in self.coordinator.all_gather_object(self.tier.domain())]
            paths = [str(p) for p in self.coordinator.all_gather_object(str(self.holdings.storage.url))]
            if len(set(paths)) > 1:  # several hosts on one machine: one name, as the pipeline requires
                self.holdings = Holdings(HostDirectory(self.tier.path, f"local-tier:{os.path.commonpath(paths)}"))
            self._holders = replica_holders(domains, self.tier.replicas)
            mine = self._holders[self.coordinator.rank]
            if any(domains[r] == domains[self.coordinator.rank] for r in mine):
                log.warning("local tier: rank %d's replicas share its failure domain %r (too few domains for "
                            "replicas=%d); pass LocalTier(failure_domain=...) to spread them",
                            self.coordinator.rank, domains[self.coordinator.rank], self.tier.replicas)
            self._token = token
        return self._token

    def _claim(self) -> None:
        """This incarnation owns every host's directory from now on (fences the previous one's zombies)."""
        token = self._start()
        if not self._claimed:
            failure = None
            try:
                self.holdings.claim(token)
            except ConcurrentWriterError as exc:
                failure = str(exc)
            self._raise_if_any(failure)
            self._claimed = True

    def _raise_if_any(self, failure: str | None) -> None:
        failures = self.coordinator.all_gather_object(failure)
        first = next((f for f in failures if f is not None), None)
        if first is not None:
            raise ConcurrentWriterError(first)

    def _check_owner(self) -> None:
        failure = None
        try:
            self.holdings.check_owner(self._start())
        except ConcurrentWriterError as exc:
            failure = str(exc)
        self._raise_if_any(failure)

    # ------------------------------------------------------------------ save
    def choose(self, step: int | None) -> str | None:
        """The tier of a ``save()`` without ``tier=`` (``LocalTier.tier_for``); ``step=None`` counts the calls."""
        self._calls += 1
        return self.tier.tier_for(self._calls if step is None else step)

    def save(self, checkpoint: ManagedCheckpoint, name: str, metadata: Mapping[str, Any] | None,
             options: CheckpointOptions | None = None) -> None:
        """Save step ``name`` to every host's directory and its replicas.

        Synchronous: returns once it is committed there. With ``options.enable_async`` the caller
        is blocked only for the checkpoint's snapshot (its async pipeline, ``saving/async_save.py``);
        the writes, the replication to peers and the manifests run on a background thread, and
        the step is committed on every host and its replicas when ``finish_local`` (the manager's
        ``sync``) returns - which re-raises a background failure.
        """
        self.finish_local()
        self._claim()
        self._check_owner()  # a zombie stops before it writes a byte
        self.holdings.delete_step(name)  # a re-save of a number: the old manifest stops counting first
        asynchronous = options is not None and options.enable_async
        local_options = CheckpointOptions(enable_async=True, async_staging_budget=options.async_staging_budget) \
            if options is not None and asynchronous else None  # never an io_device: each host writes its own
        checkpoint._write_managed(Location(self.holdings.storage, name), options=local_options, metadata=metadata,
                                  base=None)
        if not asynchronous:
            self._commit(name)
            return
        self._local = _Pending(name)
        self._local.thread = threading.Thread(target=self._in_background, args=(checkpoint, self._local),
                                              name="cloudckpt-local-save")
        self._local.thread.start()

    def _in_background(self, checkpoint: ManagedCheckpoint, pending: _Pending) -> None:
        """The background part of an async local save: wait for the pipeline's commit, then replicate
        and commit the manifests - holding the coordinator's session, as the pipeline's own
        background part does, so no other save's collectives interleave with these."""
        try:
            failure: str | None = None
            try:
                checkpoint.sync()  # the checkpoint's own background write and index commit
            except Exception as exc:
                failure = f"rank {self.coordinator.rank}: {type(exc).__name__}: {exc}"
            with self.coordinator.session():
                failures = [f for f in self.coordinator.all_gather_object(failure) if f is not None]
                if failures:
                    self.holdings.delete_step(pending.name)
                    raise SaveError(f"async local save of {self.holdings.storage.url_for(pending.name)} failed: "
                                    f"{'; '.join(failures)}")
                self._commit(pending.name)
        except BaseException as exc:
            pending.error = exc

    def finish_local(self, timeout: float | None = None) -> None:
        """Wait for the async local save in flight, if any; re-raise its failure (collective).

        Raises:
            TimeoutError: still running after ``timeout`` seconds (it keeps running).
            SaveError / ConcurrentWriterError: it failed; the step was not committed.
        """
        pending = self._local
        if pending is None or pending.thread is None:
            return
        pending.thread.join(timeout)
        if pending.thread.is_alive():
            raise TimeoutError(f"async local save of {self.holdings.storage.url_for(pending.name)} still running "
                               f"after {timeout} s")
        self._local = None
        if isinstance(pending.error, (SaveError, ConcurrentWriterError)):
            raise pending.error
        if pending.error is not None:
            raise SaveError(f"async local save of {self.holdings.storage.url_for(pending.name)} failed: "
                            f"{pending.error!r}") from pending.error

    def _commit(self, name: str) -> None:
        """After the pipeline committed the index on rank 0's directory: replicate, check ownership,
        write every host's manifest (the local commit), retention. Collective."""
        failure: str | None = None
        try:
            owners = replicate(self.holdings, self.coordinator, name, self._holders)
        except CoordinationError:
            raise  # a peer is gone: every rank's collective fails on its own
        except Exception as exc:  # this host could not store a replica: every rank fails the save
            failure, owners = f"rank {self.coordinator.rank}: {type(exc).__name__}: {exc}", {}
        failures = [f for f in self.coordinator.all_gather_object(failure) if f is not None]
        if failures:
            self.holdings.delete_step(name)
            raise SaveError(f"local save of {self.holdings.storage.url_for(name)} failed: {'; '.join(failures)}")
        text = self.holdings.storage.get(index_key(name)).decode() if self.coordinator.rank == 0 else None
        text = self.coordinator.broadcast_object(text, src=0)
        assert text is not None
        if self.coordinator.rank != 0:
            self.holdings.storage.put(index_key(name), text.encode())
        try:
            self._check_owner()  # fenced mid-save: nothing of ours commits, and what we wrote goes
        except ConcurrentWriterError:
            ours = [k for k, r in owners.items() if r == self.coordinator.rank]
            if self.holdings.index_text(name, Manifest(name, "", crc32c_of([text.encode()]))) is not None:
                ours.append(index_key(name))  # still the index we wrote (not one the new owner made)
            self.holdings.storage.delete(ours)
            raise
        manifest = Manifest(name, self._start(), crc32c_of([text.encode()]), owners)
        self.holdings.storage.put(manifest_key(name), manifest.to_bytes())
        self.coordinator.barrier()  # committed on every host and its replicas
        self._retain(step_of(name))

    def _retain(self, saved: int) -> None:
        """Keep this host's ``max_to_keep`` newest committed steps (every host decides the same), and
        remove what saves killed before their manifests left of older steps (this job owns the directory)."""
        steps = [m.name for m in self.holdings.manifests() if self.holdings.acceptable(m, self._token)]
        for name in steps[self.tier.max_to_keep:]:
            self.holdings.delete_step(name)
            log.info("local tier: deleted %s (max_to_keep=%d)", self.holdings.storage.url_for(name),
                     self.tier.max_to_keep)
        for step in list_local_tier(self.tier.path):
            if step.status == "partial" and step.number < saved:
                self.holdings.delete_step(step.name)
                log.info("local tier: removed what a killed save left of %s", self.holdings.storage.url_for(step.name))

    # ------------------------------------------------------------------ restore
    def restore(self, restore: Callable[[Location], None], at_least: int) -> str | None:
        """Restore the newest complete local step numbered ``>= at_least``; its name, or ``None``.

        ``None`` (nothing local is newer than the bucket, or every local step is incomplete or
        damaged) sends the manager to the bucket; why is logged.
        """
        self.finish_local()  # an async local save in flight commits (or fails) first
        self._claim()
        url_for = self.holdings.storage.url_for
        self.received = 0
        for candidate in candidates(self.holdings, self.coordinator, self._token, at_least):
            if not any(self._attempt(restore, candidate, attempt) for attempt in range(2)):
                continue
            if self.holdings.manifest(candidate.name) is None:
                self.holdings.storage.put(manifest_key(candidate.name), candidate.manifest.to_bytes())
            log.info("restored %s from the local tier (step %d: newest complete step, every data object "
                     "CRC32C-verified on a host; the bucket's newest is not newer)", url_for(candidate.name),
                     step_of(candidate.name))
            return candidate.name
        log.info("local tier %s: no complete step numbered >= %d; restoring from the bucket", self.url, at_least)
        return None

    def _attempt(self, restore: Callable[[Location], None], candidate: Candidate, attempt: int) -> bool:
        """Fetch what the hosts lack, restore ``candidate``; whether every host restored it (collective).

        Attempt 0 brings each host the objects it wrote; a host whose restore needed more (pieces
        of a replicated array another host wrote) fetches every object it lacks for attempt 1.
        """
        self.received += fetch(self.holdings, self.coordinator, candidate, everything=self._failed)
        self._failed = False

        def restore_here(name: str) -> None:
            try:
                restore(Location(self.holdings.storage, name))
            except Exception:
                self._failed = True
                raise

        try:
            with warnings.catch_warnings():
                if not attempt:  # a host lacking a peer's object is no damage yet
                    warnings.simplefilter("ignore", RuntimeWarning)
                restore_newest_intact(restore_here, [candidate.name], self.holdings.storage.url_for,
                                      self.coordinator if self.coordinator.world_size > 1 else None)
        except NoIntactCheckpointError as exc:
            if attempt:
                log.warning("local tier: restoring %s failed (%s); trying an older step", candidate.name, exc)
            else:
                log.info("local tier: %s needs objects beyond the hosts' own (%s); the hosts that lack them "
                         "fetch every object they lack and retry", candidate.name, exc)
            return False
        finally:
            if attempt:
                self._failed = False
        return True

    # ------------------------------------------------------------------ persist
    def persist(self, bucket: Storage, after_commit: Callable[[str, CommittedWrite], None],
                committer_rank: int) -> str:
        """Start copying the newest committed local step to ``bucket`` (collective); its name.

        The copy uploads in the background and commits at ``finish_persist`` (the manager's next
        ``sync`` or ``save``).

        Raises:
            ValueError: there is no committed local step to persist.
        """
        self.finish_local()
        self.finish_persist()
        steps = [m.name for m in self.holdings.manifests() if self.holdings.acceptable(m, self._start())]
        name = self.coordinator.broadcast_object(steps[0] if steps else None, src=committer_rank)
        if name is None:
            raise ValueError(f"save(from_local=True): the local tier {self.url} has no committed step to persist")
        self._persist = Persist(self.holdings, self.coordinator, bucket, name,
                                lambda written: after_commit(name, written), committer_rank=committer_rank)
        return str(name)

    def finish_persist(self) -> None:
        """Commit the pending persist, if any (collective); re-raise its failure."""
        pending, self._persist = self._persist, None
        if pending is not None:
            pending.finish()

    def steps(self) -> list[str]:
        """The steps this host's manifests commit, newest first (``cloudckpt ls``)."""
        return [m.name for m in self.holdings.manifests()]
