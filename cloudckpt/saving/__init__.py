"""Saving a checkpoint: one pipeline for one host and many.

Internal: not a public path (docs/architecture.md lists those), so it may move between releases.

Modules, in the order a save uses them: ``settings`` (what the options imply, once),
``plan`` (who writes which piece into which data object), ``objects`` (packing, naming and
uploading data objects), ``commit`` (the index PUT that makes a checkpoint visible, and
cleanup around it), ``committer`` (the one commit step every save path drives: the
decode-back check, the PUT, the bookkeeping), ``pipeline`` (the protocol that runs them on
a coordinator); ``async_save`` (async saves: the snapshot on the caller's thread, upload and
commit on one background worker, and ``SaveStats``).
"""

from cloudckpt.saving.collective import announce_failure
from cloudckpt.saving.committer import AfterCommit, CommittedWrite, Committer
from cloudckpt.saving.pipeline import SaveRun, save
from cloudckpt.saving.settings import SaveSettings

__all__ = ["AfterCommit", "CommittedWrite", "Committer", "SaveRun", "SaveSettings", "announce_failure", "save"]
