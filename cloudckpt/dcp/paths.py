"""What a DCP ``checkpoint_id`` means to cloudckpt: a checkpoint path, resolved once into a ``Location``.

``"s3://bucket/run/step-100"`` is the checkpoint ``step-100`` in ``s3://bucket/run`` (its
objects are ``step-100.index`` and ``step-100.data-*``, as for any cloudckpt checkpoint),
exactly as ``Checkpoint.write`` would name it. A ``Location`` is taken as is; with a
``Storage`` given to the writer/reader, a bare name (no ``/``) is a checkpoint in it.
"""

from __future__ import annotations

import os
from typing import Any, Union

from cloudckpt.errors import InvalidURLError
from cloudckpt.storage import Location, Storage, resolve, split_url

#: What DCP may pass as ``checkpoint_id`` to our writer/reader.
CheckpointId = Union[str, "os.PathLike[str]", Location]


def checkpoint_location(checkpoint_id: CheckpointId, storage: Storage | None) -> Location:
    """The ``Location`` of ``checkpoint_id``; relative to ``storage`` when one was given.

    Raises:
        ValueError: with ``storage``, an id that is not a bare checkpoint name.
        InvalidURLError: an unusable URL (unknown scheme, no bucket).
    """
    if isinstance(checkpoint_id, Location):
        return checkpoint_id
    if storage is not None:
        name = os.fspath(checkpoint_id).rstrip("/")
        if not name or "/" in name or "://" in name:
            raise ValueError(f"checkpoint_id {checkpoint_id!r}: with a storage given, pass a checkpoint name "
                             f"inside it (no '/'), e.g. 'step-100'")
        return Location(storage, name)
    return resolve(checkpoint_id)


def is_checkpoint_id(checkpoint_id: object) -> bool:
    """Whether ``checkpoint_id`` is something ``checkpoint_location`` can resolve (nothing is opened)."""
    if isinstance(checkpoint_id, Location):
        return True
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return False
    try:
        split_url(checkpoint_id)
    except (InvalidURLError, TypeError):
        return False
    return True


class Addressed:
    """The checkpoint a DCP writer or reader works on: set at construction or by DCP's ``reset``."""

    _storage: Storage | None
    _location: Location | None

    def _address(self, checkpoint_id: CheckpointId | None, storage: Storage | None) -> None:
        self._storage = storage
        self._location = None if checkpoint_id is None else checkpoint_location(checkpoint_id, storage)

    def _readdress(self, checkpoint_id: CheckpointId | None) -> None:
        """``reset(checkpoint_id)``: a new path if one is given, else the same one."""
        if checkpoint_id is not None and checkpoint_id != "":
            self._location = checkpoint_location(checkpoint_id, self._storage)

    @property
    def checkpoint_id(self) -> str | None:
        """The checkpoint's URL (what DCP logs), or ``None`` before one is given."""
        return None if self._location is None else self._location.url

    @property
    def location(self) -> Location | None:
        return self._location

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | Any) -> bool:
        return is_checkpoint_id(checkpoint_id)

    def _where(self) -> Location:
        if self._location is None:
            raise ValueError("no checkpoint path: pass it to the writer/reader, or checkpoint_id= to dcp.save/load")
        return self._location
