"""Load-status objects returned by ``Checkpoint.restore`` and ``Checkpoint.read``.

They answer TensorFlow's questions about a restore, with messages naming the key paths
at fault. Restores happen eagerly (there is no graph mode), so ``run_restore_ops`` and
``initialize_or_restore`` have nothing left to do, exactly as in TensorFlow's eager mode.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable

from cloudckpt.object_graph import live_value_paths
from cloudckpt.restoring.assign import RestoreSession
from cloudckpt.trackable import Trackable

SAVE_COUNTER = "save_counter"
_LISTED = 20


def _listing(paths: Iterable[str]) -> str:
    items = sorted(paths)
    shown = ", ".join(repr(p) for p in items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


class CheckpointLoadStatus:
    """The status of a restore from an actual checkpoint.

    Without ``expect_partial()``, checkpoint values that no object took are reported
    with a ``UserWarning`` when the status is discarded (TensorFlow logs a warning).
    """

    def __init__(self, session: RestoreSession, root: Trackable, *, expect_save_counter: bool) -> None:
        self._session = session
        self._root = root
        self._expect_save_counter = expect_save_counter
        self._finalizer = weakref.finalize(self, _warn_unused, session)
        self._finalizer.atexit = False

    def assert_consumed(self) -> CheckpointLoadStatus:
        """Every checkpoint value was restored, and every existing object got a value.

        Raises:
            AssertionError: naming the unresolved checkpoint values, or the objects that
                were not assigned a value.
        """
        unused = self._session.unused()
        if unused:
            raise AssertionError(
                f"Unresolved object(s) in checkpoint {self._session.url}: {_listing(unused)} - no "
                f"Python object took these values (yet). Attach the objects, or use "
                f"expect_partial() if a partial restore is intended.")
        return self.assert_existing_objects_matched()

    def assert_existing_objects_matched(self) -> CheckpointLoadStatus:
        """Every object now reachable from the checkpoint's root got a value from it.

        Weaker than ``assert_consumed``: values waiting for objects not yet created are fine.

        Raises:
            AssertionError: naming the objects with no value in the checkpoint.
        """
        unmatched = self._unmatched()
        if unmatched:
            raise AssertionError(
                f"Object(s) not assigned a value from checkpoint {self._session.url}: "
                f"{_listing(unmatched)}")
        return self

    def assert_nontrivial_match(self) -> CheckpointLoadStatus:
        """Something besides the root (and its save counter) matched a checkpoint value.

        Raises:
            AssertionError: the checkpoint does not match the program at all.
        """
        matched = self._session.consumed - {SAVE_COUNTER}
        if not matched:
            unmatched = self._unmatched()
            detail = (f" The following objects have no matching checkpointed value: {_listing(unmatched)}"
                      if unmatched else " No dependencies have been added to the checkpoint's root yet.")
            raise AssertionError(
                f"Nothing except the root object matched a checkpointed value in "
                f"{self._session.url}. Typically this means that the checkpoint does not match "
                f"the Python program.{detail}")
        return self

    def expect_partial(self) -> CheckpointLoadStatus:
        """Silence the warning about unused checkpoint values."""
        self._finalizer.detach()
        return self

    def run_restore_ops(self, session: object = None) -> None:
        """Nothing to run: values were assigned when ``restore`` returned (eager, as in TF 2)."""

    def initialize_or_restore(self, session: object = None) -> None:
        """Nothing to do: matched objects are restored, others keep their initial values."""

    def _unmatched(self) -> list[str]:
        consumed = self._session.consumed
        live = [p for p in live_value_paths(self._root) if p not in consumed]
        if not self._expect_save_counter:
            live = [p for p in live if p != SAVE_COUNTER]
        return live


def _warn_unused(session: RestoreSession) -> None:
    unused = session.unused()
    if unused:
        warnings.warn(
            f"Value(s) in checkpoint {session.url} were not restored: {_listing(unused)}. "
            f"Call expect_partial() on the load status to silence this when a partial restore "
            f"is intended.", UserWarning, stacklevel=2)


class InitializationOnlyStatus:
    """The status of ``restore(None)``: nothing is restored, objects keep their initial values."""

    _MESSAGE = "No checkpoint specified (save_path=None); nothing is being restored."

    def assert_consumed(self) -> InitializationOnlyStatus:
        raise AssertionError(self._MESSAGE)

    def assert_existing_objects_matched(self) -> InitializationOnlyStatus:
        raise AssertionError(self._MESSAGE)

    def assert_nontrivial_match(self) -> InitializationOnlyStatus:
        raise AssertionError(self._MESSAGE)

    def expect_partial(self) -> InitializationOnlyStatus:
        return self

    def run_restore_ops(self, session: object = None) -> None:
        """Nothing to restore."""

    def initialize_or_restore(self, session: object = None) -> None:
        """Objects are initialised when created; nothing else to do."""
