"""``cloudckpt.tools``: the operations behind the ``cloudckpt`` command, as library functions.

Each command is one function here with a typed result (frozen dataclasses); the CLI only
parses arguments, calls it and prints the result (as text or ``--json``):

=====================  =================================================  ===================
command                function                                           result
=====================  =================================================  ===================
``cloudckpt ls``       :func:`list_checkpoints`                           :class:`DirectoryListing`
``cloudckpt inspect``  :func:`inspect_checkpoint`                         :class:`CheckpointInfo` / :class:`BundleInfo`
``cloudckpt verify``   :func:`verify` (:func:`verify_checkpoint`)         :class:`VerifyReport`
``cloudckpt cp``       :func:`copy` (:func:`copy_checkpoint`)             :class:`CopyReport`
``cloudckpt export``   :func:`export`                                     :class:`ExportReport`
``cloudckpt gc``       :func:`collect_garbage`                            :class:`GcReport`
``cloudckpt rm``       :func:`remove_checkpoint` (``cloudckpt.manager``)  ``Removal``
=====================  =================================================  ===================

Why a namespace of its own rather than names on ``cloudckpt``: these functions sit above
the integrations (they read TensorFlow checkpoints through ``cloudckpt.tfbundle`` as well
as cloudckpt's own), while ``cloudckpt`` itself is the checkpoint API that training code
imports; keeping them here keeps ``import cloudckpt``'s surface the TensorFlow one.
"""

from cloudckpt.manager import remove_checkpoint
from cloudckpt.tools.copy import Copied, CopyReport, Damaged, copy, copy_checkpoint
from cloudckpt.tools.export import ExportReport, NothingToExportError, export
from cloudckpt.tools.gc import GcReport, collect_garbage
from cloudckpt.tools.inspect import BundleInfo, CheckpointInfo, inspect_checkpoint
from cloudckpt.tools.listing import CheckpointRow, DirectoryListing, list_checkpoints
from cloudckpt.tools.progress import ProgressFactory, ProgressSink
from cloudckpt.tools.verify import CheckpointVerdict, Finding, VerifyReport, verify, verify_checkpoint

__all__ = [
    "BundleInfo",
    "CheckpointInfo",
    "CheckpointRow",
    "CheckpointVerdict",
    "Copied",
    "CopyReport",
    "Damaged",
    "DirectoryListing",
    "ExportReport",
    "Finding",
    "GcReport",
    "NothingToExportError",
    "ProgressFactory",
    "ProgressSink",
    "VerifyReport",
    "collect_garbage",
    "copy",
    "copy_checkpoint",
    "export",
    "inspect_checkpoint",
    "list_checkpoints",
    "remove_checkpoint",
    "verify",
    "verify_checkpoint",
]
