"""Who owns a checkpoint directory: claiming it, keeping it, and being fenced off.

Reading never writes. A manager's first save *claims* the directory: it re-reads the
state file, adopts it, and writes it back with its own writer token by compare-and-swap.
Every later state write compares-and-swaps against the version this manager last wrote,
and every save first HEADs the state file to check nobody replaced it. A newer job
therefore fences an older one (the VM that outlived its preemption) at the older one's
next save: it raises ``ConcurrentWriterError`` and removes only what it just wrote.

Stores without conditional writes (plain fsspec protocols) cannot fence: the claim warns
once per directory, plainly, instead of pretending.

A directory holding a checkpoint of a newer format version belongs to a newer cloudckpt:
the claim refuses it (before writing anything), since saving would rewrite that writer's
state file and evict its checkpoints. The check reads every index of the directory once
per manager (one LIST, one GET per index - what the first save's leftovers cleanup reads
too); a newer writer arriving later replaces the state file, which fences this manager.
"""

from __future__ import annotations

import logging
import threading
import uuid
import warnings
from collections.abc import Callable

from cloudckpt.errors import (
    BucketNotFoundError,
    CheckpointFormatError,
    CheckpointStateError,
    ConcurrentWriterError,
    NotFoundError,
    PreconditionError,
    StorageError,
)
from cloudckpt.format import index_key
from cloudckpt.format.index_fetch import newer_format, read_index
from cloudckpt.format.references import delete_unreferenced, index_names, scan
from cloudckpt.format.state_file import STATE_KEY, CheckpointState, write_state
from cloudckpt.manager.directory import read_state_tolerant, relative_name
from cloudckpt.saving import CommittedWrite
from cloudckpt.storage import ObjectMeta, Storage

log = logging.getLogger("cloudckpt.manager")

_CLAIM_ATTEMPTS = 20
_warned_unfenced: set[str] = set()
_warned_lock = threading.Lock()


class DirectoryOwnership:
    """This manager's claim on one directory's state file.

    Args:
        storage: the directory.
        on_garbled: told (once per manager) when the state file is unreadable; the claim then
            replaces exactly that unreadable version.
    """

    def __init__(self, storage: Storage, on_garbled: Callable[[CheckpointStateError], None]) -> None:
        self.storage = storage
        self.token = uuid.uuid4().hex
        self._on_garbled = on_garbled
        self._state_meta: ObjectMeta | None = None
        self._state: CheckpointState | None = None  # what this manager last wrote
        self.claimed = False
        self._fenced: ConcurrentWriterError | None = None

    def read(self) -> tuple[CheckpointState, ObjectMeta] | None:
        """The state file as it is now (``None``: absent or garbled)."""
        return read_state_tolerant(self.storage, on_garbled=self._on_garbled)

    def claim(self, adopt: Callable[[CheckpointState | None], CheckpointState]) -> None:
        """Take the directory: re-read its state, ``adopt`` it, write the result back by CAS.

        ``adopt(found)`` merges what is on store into the manager and returns the state to
        write (with this manager's token); it may run more than once if writers race.

        Raises:
            ConcurrentWriterError: the state file kept changing under us, or the directory
                holds a checkpoint of a newer format version (nothing is written then).
        """
        self._refuse_newer_format()
        self._warn_if_unfenced()
        for _ in range(_CLAIM_ATTEMPTS):
            found = self.read()
            state = adopt(found[0] if found else None)
            expected = found[1] if found else self._unreadable_version()
            try:
                self._state_meta = write_state(self.storage, state, expected)
            except PreconditionError:
                continue
            self._state = state
            self.claimed = True
            log.info("claimed %s for writer %s", self.storage.url, self.token[:8])
            return
        raise ConcurrentWriterError(f"could not claim {self.storage.url}: its state file kept changing")

    def check_still_owner(self) -> None:
        """Cheap pre-upload check: has anyone replaced the state file since our last write?

        Raises:
            ConcurrentWriterError: yes (or this manager was fenced before).
        """
        if self._fenced is not None:
            raise self._fenced
        try:
            current: ObjectMeta | None = self.storage.head(STATE_KEY)
        except NotFoundError:
            current = None
        if current is None and self._state is not None:
            self.fence(self._state_gone())
        if current is None or self._state_meta is None or current.version != self._state_meta.version:
            self.fence(f"another writer took over {self.storage.url} (its state file changed since this "
                       "manager's last save); this manager will not save again")

    def write(self, state: CheckpointState) -> None:
        """Replace the state file we last wrote.

        Raises:
            PreconditionError: another writer replaced it since (the caller undoes and fences).
        """
        self._state_meta = write_state(self.storage, state, self._state_meta)
        self._state = state

    def fence(self, message: str) -> None:
        """Stop this manager for good: every later save raises the same error."""
        self._fenced = ConcurrentWriterError(message)
        raise self._fenced

    def undo_write(self, written: CommittedWrite) -> None:
        """Remove what one save wrote - and nothing another writer may have replaced it with
        or referenced since (the newer writer's incremental saves may name our objects)."""
        try:
            current = self.storage.head(index_key(written.name))
            if current.version == written.index_version:
                self.storage.delete(index_key(written.name))
        except NotFoundError:
            pass
        delete_unreferenced(self.storage, written.data_keys)

    def _state_gone(self) -> str:
        """Why the save is refused when the state file this manager wrote has disappeared.

        No other writer deletes a state file (they replace it), so this is a wiped directory or
        bucket, or a person's cleanup: say which of our checkpoints went with it (one LIST,
        only on this failure) and what to do, instead of blaming a writer that does not exist.
        """
        state_url = self.storage.url_for(STATE_KEY)
        ours = [relative_name(p, self.storage.url) for p in self._state.all_model_checkpoint_paths] \
            if self._state is not None else []
        advice = (f"This manager will not save again: its checkpoint numbering and incremental saves build on "
                  f"what it wrote there. To start over in {self.storage.url}, create a new CheckpointManager (its "
                  "first save claims the directory afresh); to keep the old run, put its objects back first, or "
                  "save to another directory.")
        try:
            present = set(index_names(self.storage))
        except BucketNotFoundError:
            return (f"the bucket of {self.storage.url} no longer exists: it was deleted since this manager's last "
                    f"save, with the state file {state_url} and every checkpoint in it. Create the bucket again, "
                    "then a new CheckpointManager (its first save claims the directory afresh).")
        except StorageError as exc:
            return (f"the state file {state_url} was deleted since this manager's last save (its checkpoints could "
                    f"not be listed: {exc}). {advice}")
        gone = [name for name in ours if name not in present]
        if not gone:
            return (f"the state file {state_url} was deleted since this manager's last save; its checkpoints are "
                    f"still there, so someone removed just that file. {advice}")
        return (f"the state file {state_url} was deleted since this manager's last save, and {len(gone)} of the "
                f"{len(ours)} checkpoints it manages are gone too ({', '.join(gone)}): the directory was emptied "
                f"(or these objects deleted) while this job ran. {advice}")

    def _refuse_newer_format(self) -> None:
        """Fence this manager if a committed index of the directory is of a newer format version."""
        for name in scan(self.storage).newer:  # a newer or an unusable version: read again to tell which
            try:
                read_index(self.storage, name)
            except CheckpointFormatError as exc:
                if newer_format(exc) is not None:
                    self.fence(f"{exc}. {self.storage.url} holds checkpoints of a newer cloudckpt, which owns it: "
                               "this manager will not save there (it would rewrite that writer's state file and "
                               "evict its checkpoints) - upgrade cloudckpt, or save to another directory")

    def _unreadable_version(self) -> ObjectMeta | None:
        """When the state file is unreadable we replace it, but only that exact version."""
        try:
            return self.storage.head(STATE_KEY)
        except NotFoundError:
            return None

    def _warn_if_unfenced(self) -> None:
        if self.storage.supports_conditional_writes:
            return
        with _warned_lock:
            if self.storage.url in _warned_unfenced:
                return
            _warned_unfenced.add(self.storage.url)
        warnings.warn(
            f"{self.storage.url}: this store has no conditional writes, so CheckpointManager cannot fence "
            "writers here - a second manager (or a zombie VM of an earlier job) saving to this directory can "
            "silently overwrite this one's state file. Use one writer per directory, or local disk, s3:// or "
            "gs://, which fence (docs/storage.md).", RuntimeWarning, stacklevel=4)
