"""The one commit step every save path drives: data durable -> index decoded back -> conditional PUT -> bookkeeping.

``saving.pipeline.SaveRun`` (``Checkpoint``, ``DTensorCheckpoint``), the DCP writer
(``cloudckpt.dcp``) and the local tier commit through a ``Committer``, so what makes a
checkpoint visible exists once. Its call order, on the committing rank::

    look()            HEAD the index before any byte is uploaded: a rival commit during
                      the upload then fails this one instead of being replaced
    ... every rank's data objects are stored (the driver's protocol) ...
    commit(index)     encode the index, decode it back with the validator readers use
                      (never commit what no reader accepts), PUT it conditionally on what
                      ``look`` saw, then run the after-commit bookkeeping
    delete_replaced() once the commit stands: the data of the index it replaced
    discard(started)  on any failure before the commit: a rank's own data objects

The drivers differ only in how ranks agree and report (``SaveRun``'s gather/broadcast,
DCP's own planning and ``finish``); the steps above, their errors and their results are
the same.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from cloudckpt._testhooks import crash_point
from cloudckpt.errors import AfterCommitError
from cloudckpt.format import ArrayEntry, CheckpointIndex, DataObject
from cloudckpt.format.index_fetch import head_index
from cloudckpt.saving.collective import describe_error
from cloudckpt.saving.commit import commit, delete_replaced, discard
from cloudckpt.storage import ObjectMeta, Storage


@dataclass(frozen=True, slots=True)
class CommittedWrite:
    """What a committed write stored.

    Attributes:
        name: the checkpoint's name (relative to its directory).
        bytes: bytes stored (data objects and index).
        objects: objects stored (data objects and index).
        index_version: the committed index's version (ETag / generation), so a manager
            that must undo this write deletes the index only if it is still ours.
        data_keys: the data objects this write made (not those an incremental save reused).
        reused_bytes: bytes of pieces an incremental save referenced instead of uploading.
    """

    name: str
    bytes: int
    objects: int
    index_version: str | None
    data_keys: tuple[str, ...]
    reused_bytes: int = 0


#: Runs on the committing rank right after the commit (the manager's bookkeeping).
AfterCommit = Callable[[CommittedWrite], None]


class Committer:
    """The commit of one save to ``storage``/``name``, on the rank that commits it.

    Args:
        storage: where the checkpoint goes.
        name: the checkpoint's name in ``storage``.
        after_commit: the bookkeeping to run once the index stands (a manager's state file).
        rank: this rank, named in the ``AfterCommitError`` a failed bookkeeping raises.
    """

    def __init__(self, storage: Storage, name: str, *, after_commit: AfterCommit | None = None,
                 rank: int = 0) -> None:
        self.storage = storage
        self.name = name
        self.after_commit = after_commit
        self.rank = rank
        self._seen: ObjectMeta | None = None
        self._stale: list[str] = []
        self._committed = False

    @property
    def seen(self) -> ObjectMeta | None:
        """What ``look`` found at the index (``None``: nothing)."""
        return self._seen

    def look(self) -> ObjectMeta | None:
        """HEAD the index before anything is uploaded; the commit is conditional on what it finds."""
        self._seen = head_index(self.storage, self.name)
        return self._seen

    def commit(self, index: CheckpointIndex, written: Sequence[DataObject]) -> CommittedWrite:
        """Commit ``index`` (every data object it names is stored), then run the bookkeeping.

        ``written`` are the data objects this save uploaded (the rest of ``index.objects``
        belong to earlier checkpoints an incremental save references).

        Raises:
            CheckpointFormatError: the index would not decode - a reader would refuse it;
                nothing was committed.
            ConcurrentWriterError: another writer committed since ``look``; nothing was committed.
            SaveError: an object of an earlier checkpoint the index names is gone or resized.
            AfterCommitError: the index was committed but the bookkeeping failed (its
                ``__cause__`` is the bookkeeping's own error); the replaced data stays.
        """
        size, version, self._stale = commit(self.storage, index, self._seen)
        self._committed = True
        crash_point("after_index_write")
        new_bytes = sum(o.size for o in written)
        chunk_bytes = sum(c.length for e in index.entries.values() if isinstance(e, ArrayEntry) for c in e.chunks)
        result = CommittedWrite(self.name, new_bytes + size, len(written) + 1, version,
                                tuple(o.name for o in written), chunk_bytes - new_bytes)
        if self.after_commit is not None:
            try:
                self.after_commit(result)
            except Exception as exc:
                url = self.storage.url_for(self.name)
                raise AfterCommitError(
                    f"{url}: the checkpoint is complete and valid (its index was committed), but the bookkeeping "
                    f"after the commit failed: {describe_error(exc)}", {self.rank: describe_error(exc)}) from exc
        return result

    def delete_replaced(self) -> None:
        """Delete the data of the index the commit replaced that no committed index names (best effort)."""
        stale, self._stale = self._stale, []
        delete_replaced(self.storage, self.name, stale)

    def discard(self, started: Collection[str]) -> None:
        """Remove a failed save's data objects ``started`` (kept if a committed index names them).

        Nothing is removed once this committer's own commit stood (an interrupt in the
        bookkeeping must not take the data of a complete checkpoint).
        """
        if not self._committed:
            discard(self.storage, self.name, started)
