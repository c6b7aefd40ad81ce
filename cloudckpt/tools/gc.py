"""``collect_garbage``: find, and when asked delete, what crashed saves left in a checkpoint directory.

All the judgement lives in ``cloudckpt.manager.cleanup`` (the same code a manager's first save
runs): what counts as a leftover, ages by the store's clock, re-checking each data object
against the committed indexes right before deleting it. This module gives it one call and
a typed report. A dry run is the default because deleting cannot be undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cloudckpt.manager.cleanup import Leftover, Removal, find_leftovers, remove_leftovers
from cloudckpt.tools.directory import open_directory


@dataclass(frozen=True, slots=True)
class GcReport:
    """What :func:`collect_garbage` found and (unless a dry run) removed.

    Attributes:
        directory: the directory's URL.
        min_age: only what was older than this (by the store's clock) was considered.
        leftovers: what crashed saves left (a dry run: what would be deleted).
        removal: what deleting them did; ``None`` for a dry run or when nothing was found.
        failed_urls: ``(url, error)`` of each leftover that could not be removed.
    """

    directory: str
    min_age: timedelta
    leftovers: tuple[Leftover, ...]
    removal: Removal | None
    failed_urls: tuple[tuple[str, str], ...] = ()

    @property
    def dry_run(self) -> bool:
        return self.removal is None

    @property
    def known_bytes(self) -> int:
        """The leftovers' sizes added up (an S3 multipart upload's size is unknown: 0)."""
        return sum(item.size or 0 for item in self.leftovers)

    @property
    def failed(self) -> tuple[tuple[str, str], ...]:
        """``(key, error)`` of each leftover that could not be removed."""
        return self.removal.failed if self.removal is not None else ()

    def to_json(self, *, dry_run: bool) -> dict[str, Any]:
        """``cloudckpt gc --json``'s document (``dry_run``: what the caller asked, as it always said)."""
        removal = self.removal
        return {"directory": self.directory, "min_age_seconds": self.min_age.total_seconds(), "dry_run": dry_run,
                "leftovers": [{"kind": item.kind, "key": item.key, "size": item.size,
                               "age_seconds": item.age.total_seconds(), "upload_id": item.upload_id}
                              for item in self.leftovers],
                "removed": removal.removed if removal else 0, "bytes_freed": removal.bytes if removal else 0,
                "failed": [{"key": key, "error": error} for key, error in self.failed]}


def collect_garbage(url: str, min_age: timedelta, *, delete: bool = False) -> GcReport:
    """What crashed saves left in the directory ``url`` older than ``min_age``; deleted when ``delete``.

    Never touches an index, anything a committed index names, the state file, or
    sub-directories. ``min_age`` must exceed the longest save: a save in flight looks like
    a crashed one until it commits. Removal failures are reported (``GcReport.failed``), not raised.
    """
    storage = open_directory(url.rstrip("/") or url)
    found = find_leftovers(storage, min_age=min_age)
    removal = remove_leftovers(storage, found) if delete and found else None
    failed = tuple((storage.url_for(key), error) for key, error in removal.failed) if removal else ()
    return GcReport(storage.url, min_age, tuple(found), removal, failed)
