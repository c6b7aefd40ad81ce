"""``CheckpointOptions``: TensorFlow's argument names, validated when constructed.

Why validate early: a misspelt device string or a callback with the wrong arity would
otherwise surface only after a long training step, in the middle of a save.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cloudckpt.errors import SaveError

#: Default staging budget of async saves: the snapshot copy never exceeds it.
DEFAULT_STAGING_BUDGET = 4 * 1024**3

_COMPONENT = re.compile(
    r"(?i)(?:(job):([A-Za-z_][A-Za-z0-9_-]*)|(replica):(\d+)|(task):(\d+)"
    r"|device:([A-Za-z_]+):(\d+|\*)|(cpu|gpu|tpu):(\d+|\*))")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A parsed TensorFlow device string (``/job:worker/replica:0/task:1/device:CPU:0``)."""

    job: str | None = None
    replica: int | None = None
    task: int | None = None
    device_type: str | None = None
    device_index: str | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """Parse ``text``; ``ValueError`` naming the bad component otherwise."""
        if not isinstance(text, str) or not text.strip("/"):
            raise ValueError(f"experimental_io_device must be a TensorFlow device string such as "
                             f"'/job:localhost', got {text!r}")
        fields: dict[str, Any] = {}
        for part in text.strip().lstrip("/").split("/"):
            match = _COMPONENT.fullmatch(part)
            if match is None:
                raise ValueError(f"experimental_io_device {text!r}: {part!r} is not a device component "
                                 f"(expected job:NAME, replica:N, task:N, device:TYPE:N or CPU:N)")
            groups = match.groups()
            if groups[0]:
                name, value = "job", groups[1]
            elif groups[2]:
                name, value = "replica", int(groups[3])
            elif groups[4]:
                name, value = "task", int(groups[5])
            else:
                name, value = "device", ((groups[6] or groups[8]).upper(), groups[7] or groups[9])
            if name in fields:
                raise ValueError(f"experimental_io_device {text!r}: {name} given twice")
            fields[name] = value
        device = fields.pop("device", (None, None))
        return cls(job=fields.get("job"), replica=fields.get("replica"), task=fields.get("task"),
                   device_type=device[0], device_index=device[1])


def _takes_save_path(callback: Callable[..., Any]) -> bool:
    """Whether the callback gets ``save_path``; ``TypeError`` if it can take neither 0 nor 1 argument."""
    if not callable(callback):
        raise TypeError(f"experimental_write_callbacks must hold callables, got {callback!r}")
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):
        return True  # builtins without a signature: TensorFlow passes the path to one-argument callables
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    required_kw = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values())
    if len(required) > 1 or required_kw:
        raise TypeError(f"write callback {callback!r} must take zero arguments or one (save_path), "
                        f"its signature is {signature}")
    return bool(positional) or variadic


class CheckpointOptions:
    """Options for ``Checkpoint.save``/``write``/``read``/``restore`` (TensorFlow's names).

    Args:
        experimental_io_device: a TensorFlow device string (``"/job:localhost"``,
            ``"/job:worker/replica:0/task:1"``); in a multi-host job, the host that does
            all storage I/O. A no-op in one process. Validated here.
        experimental_enable_async_checkpoint: deprecated spelling of ``enable_async``
            (warns with ``DeprecationWarning``).
        experimental_write_callbacks: callables run in order after the checkpoint is
            committed (for async saves: after the background write), with ``save_path``
            if they take an argument. Copied: the caller's list is never mutated.
        enable_async: save in the background; the caller waits only for a snapshot.
        async_staging_budget: bytes the async snapshot may occupy (default 4 GiB). State
            beyond it is uploaded from live memory before ``save`` returns.
    """

    __slots__ = ("_callbacks", "async_staging_budget", "enable_async", "experimental_io_device", "io_device_spec")

    def __init__(self, experimental_io_device: str | None = None, experimental_enable_async_checkpoint: bool = False,
                 experimental_write_callbacks: Iterable[Callable[..., Any]] | None = None,
                 enable_async: bool = False, *, async_staging_budget: int = DEFAULT_STAGING_BUDGET) -> None:
        self.io_device_spec = None if experimental_io_device is None else DeviceSpec.parse(experimental_io_device)
        self.experimental_io_device = experimental_io_device
        if experimental_enable_async_checkpoint:
            warnings.warn("experimental_enable_async_checkpoint is deprecated; use enable_async=True",
                          DeprecationWarning, stacklevel=2)
        self.enable_async = bool(enable_async or experimental_enable_async_checkpoint)
        callbacks = tuple(experimental_write_callbacks or ())
        self._callbacks = tuple((cb, _takes_save_path(cb)) for cb in callbacks)
        if isinstance(async_staging_budget, bool) or not isinstance(async_staging_budget, int) \
                or async_staging_budget < 0:
            raise ValueError(f"async_staging_budget must be a non-negative int, got {async_staging_budget!r}")
        self.async_staging_budget = async_staging_budget

    @property
    def experimental_enable_async_checkpoint(self) -> bool:
        """Same as ``enable_async`` (TensorFlow keeps both attributes in step)."""
        return self.enable_async

    @property
    def experimental_write_callbacks(self) -> tuple[Callable[..., Any], ...]:
        return tuple(cb for cb, _ in self._callbacks)

    def run_write_callbacks(self, save_path: str) -> None:
        """Run every callback in order; if any raised, raise ``SaveError`` after all ran.

        Why all of them: one failing callback (say, a metrics upload) must not stop the
        others (say, the one that tells an orchestrator the checkpoint is ready).
        """
        failures: list[BaseException] = []
        for callback, takes_path in self._callbacks:
            try:
                callback(save_path) if takes_path else callback()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise SaveError(f"{len(failures)} write callback(s) failed after {save_path} was committed "
                            f"(the checkpoint itself is complete): {failures[0]!r}") from failures[0]

    def __repr__(self) -> str:
        return (f"CheckpointOptions(experimental_io_device={self.experimental_io_device!r}, "
                f"enable_async={self.enable_async}, experimental_write_callbacks="
                f"{list(self.experimental_write_callbacks)!r})")
