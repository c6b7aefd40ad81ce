"""A bucket save made from a committed local step: no second snapshot of the live state.

``Persist`` copies the data objects of a local step to the bucket in a background thread,
each object uploaded once by the lowest rank holding it (its writer when it has it), and
commits at ``finish`` - the manager's next ``sync()`` or ``save()``, on the caller's thread,
so the collectives never run beside the training loop's (the same rule as async saves). The
commit is the one commit path (``saving/committer.py``): HEAD the index before any upload,
validate the index, conditional PUT, the manager's bookkeeping; any host's failure removes
what the hosts uploaded and raises.
"""

from __future__ import annotations

import logging
import threading

from cloudckpt.coordination import Coordinator
from cloudckpt.errors import SaveError
from cloudckpt.format import index_key
from cloudckpt.manager.tiers.holdings import Holdings
from cloudckpt.saving import AfterCommit, Committer
from cloudckpt.saving.commit import discard
from cloudckpt.storage import Storage

log = logging.getLogger("cloudckpt.manager.tiers")


class Persist:
    """One local step on its way to the bucket (collective to start and to finish).

    Raises (from the constructor): ``SaveError`` when no host holds one of the step's objects.
    """

    def __init__(self, holdings: Holdings, coordinator: Coordinator, bucket: Storage, name: str,
                 after_commit: AfterCommit, *, committer_rank: int = 0) -> None:
        self.name = name
        self._holdings, self._coordinator, self._bucket = holdings, coordinator, bucket
        self._rank0 = committer_rank
        manifest = holdings.manifest(name)
        owners = manifest.owners if manifest is not None else {}
        held = coordinator.all_gather_object(sorted(holdings.data_objects(name)))
        uploader: dict[str, int] = {}
        for key in sorted({k for keys in held for k in keys} | set(owners)):
            ranks = [r for r, keys in enumerate(held) if key in keys]
            if not ranks:
                raise SaveError(f"cannot persist {holdings.storage.url_for(name)}: no host holds {key}")
            uploader[key] = owners[key] if owners.get(key) in ranks else ranks[0]
        self._mine = [k for k, r in uploader.items() if r == coordinator.rank]
        self._committer = Committer(bucket, name, after_commit=after_commit, rank=coordinator.rank) \
            if coordinator.rank == committer_rank else None
        if self._committer is not None:
            self._committer.look()  # a rival commit during our upload then fails ours
        self._error: str | None = None
        self._thread = threading.Thread(target=self._upload, name="cloudckpt-persist", daemon=True)
        self._thread.start()

    def _upload(self) -> None:
        try:
            for key in self._mine:
                with self._holdings.storage.view(key) as data:
                    self._bucket.put(key, data, mode="create")
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"

    def finish(self) -> None:
        """Wait for every host's uploads, then commit on the committing rank (collective)."""
        self._thread.join()
        errors = [e for e in self._coordinator.all_gather_object(self._error) if e is not None]
        failure = errors[0] if errors else None
        if self._committer is not None and failure is None:
            try:
                text = self._holdings.storage.get(index_key(self.name))
                index = self._holdings.decode(self.name, text.decode())
                self._committer.commit(index, index.objects)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
        failure = self._coordinator.broadcast_object(failure, src=self._rank0)
        if failure is not None:
            discard(self._bucket, self.name, self._mine)
            raise SaveError(f"persisting {self._holdings.storage.url_for(self.name)} to "
                            f"{self._bucket.url_for(self.name)} failed: {failure}")
        log.info("persisted local step %s to %s (uploaded from the local copies)", self.name,
                 self._bucket.url_for(self.name))
