"""Finding and removing what crashed saves left behind in a checkpoint directory.

A save that dies before its commit leaves bytes no reader will ever use: data objects
no index names, temporary objects (GCS compose chunks, local temp files, write probes
under ``TEMP_PREFIX``) and, on S3, incomplete multipart uploads whose parts are billed
until aborted. They are harmless to correctness - a checkpoint exists iff its index
does - but they cost money on every preemption, forever.

Why ages come from the store's clock: the question is "could a writer still be
uploading this?", and the only clock that stamped the objects is the store's. A VM's
clock may be minutes off. ``min_age`` is the guard against deleting a save in flight
(another process, or a zombie VM still uploading): nothing younger is touched, so it
must exceed the longest save. Both users - ``CheckpointManager``'s first save and
``cloudckpt gc`` - go through :func:`find_leftovers` and :func:`remove_leftovers`.

What is never touched: an index, anything an index names (``cloudckpt.format.references``: a
malformed index protects its own checkpoint's data objects; one of a newer format version
protects every data object), the state file, objects in sub-directories (other runs), and
anything that does not look like ours.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cloudckpt.format import INDEX_SUFFIX, object_checkpoint
from cloudckpt.format.references import scan
from cloudckpt.storage import Storage
from cloudckpt.storage.base import TEMP_PREFIX

log = logging.getLogger("cloudckpt.manager.cleanup")

LeftoverKind = Literal["unreferenced-data", "temporary", "multipart-upload"]


@dataclass(frozen=True, slots=True)
class Leftover:
    """One object (or multipart upload) a crashed save left behind.

    Attributes:
        kind: ``unreferenced-data`` (a data object no index names), ``temporary`` (under
            ``TEMP_PREFIX``) or ``multipart-upload`` (an incomplete S3 upload).
        key: the object's key, relative to the directory.
        size: bytes, when the store reports them (not for multipart uploads).
        age: how long ago the store stamped it, by the store's clock.
        upload_id: the multipart upload to abort (``multipart-upload`` only).
    """

    kind: LeftoverKind
    key: str
    size: int | None
    age: timedelta
    upload_id: str | None = None


@dataclass(frozen=True, slots=True)
class Removal:
    """What :func:`remove_leftovers` did: counts and bytes freed (known sizes only)."""

    removed: int
    bytes: int
    failed: tuple[tuple[str, str], ...] = ()


def find_leftovers(storage: Storage, *, min_age: timedelta) -> list[Leftover]:
    """Everything in ``storage``'s directory that crashed saves left and is older than ``min_age``.

    Only reads (LIST, GET of each index, the store's clock); nothing is deleted.

    Raises:
        ValueError: ``min_age`` is negative.
    """
    if min_age < timedelta(0):
        raise ValueError(f"min_age must not be negative, got {min_age}")
    now = storage.server_time()
    objects = storage.list()
    temporaries = storage.list(TEMP_PREFIX)  # some backends hide these from a plain listing
    indexes = [m.key[:-len(INDEX_SUFFIX)] for m in objects if "/" not in m.key and m.key.endswith(INDEX_SUFFIX)]
    references = scan(storage, indexes)
    found: list[Leftover] = []

    def old(stamp: datetime | None) -> timedelta | None:
        if stamp is None:
            return None
        # The Date header has 1 s resolution: an object stamped within that second can look
        # younger than "now"; count it as age 0 rather than negative.
        age = max(now - stamp, timedelta(0))
        return age if age >= min_age else None

    for meta in objects:
        if object_checkpoint(meta.key) is None or references.protects(meta.key):
            continue
        age = old(meta.last_modified)
        if age is not None:
            found.append(Leftover("unreferenced-data", meta.key, meta.size, age))
    for meta in temporaries:
        age = old(meta.last_modified)
        if age is not None:
            found.append(Leftover("temporary", meta.key, meta.size, age))
    list_uploads = getattr(storage, "list_multipart_uploads", None)
    if list_uploads is not None:
        for upload in list_uploads(""):
            if "/" in upload.key and not upload.key.startswith(TEMP_PREFIX) and object_checkpoint(upload.key) is None:
                continue  # a sub-directory's upload: another run's business (not a spread data object of ours)
            age = old(upload.initiated)
            if age is not None:
                found.append(Leftover("multipart-upload", upload.key, None, age, upload.upload_id))
    return found


def remove_leftovers(storage: Storage, leftovers: Sequence[Leftover]) -> Removal:
    """Delete ``leftovers`` (as found by :func:`find_leftovers`); failures are reported, not raised.

    Data objects are re-checked against every committed index right before deletion, so a
    save that committed between the listing and now keeps its bytes (and so do objects a
    new incremental checkpoint references).
    """
    data = [item for item in leftovers if item.kind == "unreferenced-data"]
    doomed: list[Leftover] = []
    if data:
        deletable = set(scan(storage).deletable([item.key for item in data]))
        doomed.extend(item for item in data if item.key in deletable)
    doomed.extend(item for item in leftovers if item.kind == "temporary")
    removed, freed = 0, 0
    failed: list[tuple[str, str]] = []
    if doomed:
        try:
            storage.delete([item.key for item in doomed])
            removed, freed = len(doomed), sum(item.size or 0 for item in doomed)
        except Exception as exc:
            failed.extend((item.key, str(exc)) for item in doomed)
    abort = getattr(storage, "abort_multipart_upload", None)
    for item in leftovers:
        if item.kind != "multipart-upload" or abort is None or item.upload_id is None:
            continue
        try:
            abort(item.key, item.upload_id)
            removed += 1
        except Exception as exc:
            failed.append((item.key, str(exc)))
    if removed or failed:
        log.info("removed %d leftover(s) of crashed saves in %s (%d bytes)%s", removed, storage.url, freed,
                 f"; {len(failed)} could not be removed" if failed else "")
    return Removal(removed, freed, tuple(failed))

