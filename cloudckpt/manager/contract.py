"""What ``CheckpointManager`` takes: the checkpoint it manages, and its arguments in the forms TF accepts.

``ManagedCheckpoint`` is the protocol a ``Checkpoint``, a ``DTensorCheckpoint`` and a
``cloudckpt.dcp.DCPCheckpoint`` implement; the manager relies on nothing else of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Protocol

from cloudckpt.coordination import Coordinator
from cloudckpt.options import CheckpointOptions
from cloudckpt.saving import AfterCommit
from cloudckpt.storage import Location


class ManagedCheckpoint(Protocol):
    """What ``CheckpointManager`` needs of the object it manages (``Checkpoint`` and its kin)."""

    @property
    def save_counter(self) -> Any: ...

    @property
    def coordinator(self) -> Coordinator | None: ...

    def _write_managed(self, path: Location, options: CheckpointOptions | None = None, *,
                       after_commit: AfterCommit | None = None, metadata: Mapping[str, Any] | None = None,
                       base: str | None = None) -> str: ...

    def restore(self, save_path: Any, options: CheckpointOptions | None = None) -> Any: ...

    def sync(self, timeout: float | None = None) -> None: ...


def as_number(value: Any, what: str) -> int:
    """An int from an int, a numpy scalar, a ``Variable`` or a tensor (TF accepts all)."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an integer or hold one, got {type(value).__name__}") from None
    return number


def as_age(value: float | timedelta | None) -> timedelta | None:
    if value is None:
        return None
    age = value if isinstance(value, timedelta) else timedelta(seconds=float(value))
    if age < timedelta(0):
        raise ValueError(f"leftover_min_age must not be negative, got {value!r}")
    return age
