"""``PyTreeCheckpoint``, ``save`` and ``restore``: a JAX pytree through the one save pipeline and reader.

A ``PyTreeCheckpoint`` is a ``Checkpoint`` whose dependencies are the tree's top-level
keys (``cloudckpt.jax.pytree`` turns the tree into nested dicts by its key paths), so
everything a ``Checkpoint`` does - the commit protocol, async saves with their staging
buffer, incremental saves, ``CheckpointManager`` with its retention, fencing and
preemption handling - serves JAX state unchanged. Restoring replaces ``tree`` with a new
tree of ``tree``'s structure (it is the ``like``): ``jax.Array`` leaves come back as new
arrays with the sharding of the old ones (or of a ``jax.ShapeDtypeStruct``'s), each
process reading only the boxes its devices hold; other leaves come back as their own kind.

In a multi-process job (``jax.process_count() > 1``) every process constructs it and calls
``save``/``restore`` together; the saves run on ``JaxCoordinator`` (JAX's own distributed
runtime), each process writing only its addressable shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax

from cloudckpt.checkpoint import Checkpoint
from cloudckpt.coordination import Coordinator
from cloudckpt.errors import CheckpointMismatchError
from cloudckpt.jax.coordinator import jax_coordinator
from cloudckpt.jax.pytree import flatten, from_graph, to_graph
from cloudckpt.leaves.jax_array import is_prng_key, start_host_copies
from cloudckpt.options import CheckpointOptions
from cloudckpt.restoring.load_status import SAVE_COUNTER, CheckpointLoadStatus, InitializationOnlyStatus
from cloudckpt.storage import CheckpointPath
from cloudckpt.trackable import DEFERRED_ATTR, Trackable


class _Graph(Trackable):
    """The tree's top-level segments as this object's attributes, in tree order.

    Restore's setter replaces a top-level value with ``object.__setattr__`` on the object
    that owns it: here, so the restored values are found again in ``_top_values``. Keys that
    would shadow what the object graph calls on it (``_checkpoint_dependencies``, ...) are refused.
    """

    def __init__(self, top: dict[Any, Any]) -> None:
        for name, value in top.items():
            if not isinstance(name, str):
                raise ValueError(f"cannot checkpoint the tree: its top-level key {name!r} is not a string (the "
                                 f"top-level keys are the checkpoint's dependencies)")
            if name in (SAVE_COUNTER, DEFERRED_ATTR) or hasattr(_Graph, name):
                raise ValueError(f"cannot checkpoint the tree: its top-level key {name!r} is reserved")
            object.__setattr__(self, name, value)

    def _checkpoint_dependencies(self) -> Iterator[tuple[str, Any]]:
        yield from _top_values(self).items()


def _top_values(graph: _Graph) -> dict[Any, Any]:
    """The top-level values (a function, not a method: a method's name could be a key of the tree)."""
    return {k: v for k, v in vars(graph).items() if k != DEFERRED_ATTR}


class PyTreeCheckpoint(Checkpoint):
    """A JAX pytree for ``CheckpointManager`` (and ``save``/``write``/``restore`` like a ``Checkpoint``).

    Args:
        tree: the pytree to save; a restore replaces it (it is the restore's ``like``).
        coordinator: the job's coordinator; default: ``JaxCoordinator`` when
            ``jax.process_count() > 1``, else none (one process).

    Attributes:
        tree: the pytree. Assign a new one between steps (jitted steps return new arrays);
            every save saves what ``tree`` holds then.
    """

    tree: Any
    _graph: _Graph | None

    def __init__(self, tree: Any, *, coordinator: Coordinator | None = None) -> None:
        super().__init__()
        if coordinator is None and jax.process_count() > 1:
            coordinator = jax_coordinator()
        object.__setattr__(self, "tree", tree)
        object.__setattr__(self, "_graph", None)
        object.__setattr__(self, "_coordinator", coordinator)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # ``tree`` is not a dependency: its contents are

    def _checkpoint_dependencies(self) -> Iterator[tuple[str, Any]]:
        yield SAVE_COUNTER, self._save_counter
        graph = self._graph
        if graph is None:  # a save: the tree as it is now, every array's host copy started at once
            flat = flatten(self.tree)
            for leaf in flat.leaves:
                if isinstance(leaf, jax.Array) and not is_prng_key(leaf):
                    start_host_copies(leaf)
            graph = _Graph(to_graph(flat, for_restore=False))
        yield from graph._checkpoint_dependencies()

    def _attribute_owner(self, name: str) -> Trackable:
        return self._graph if self._graph is not None and name != SAVE_COUNTER else self

    def _restore(self, save_path: CheckpointPath | None, options: CheckpointOptions | None, *,
                 expect_save_counter: bool) -> CheckpointLoadStatus | InitializationOnlyStatus:
        """Restore into targets made from ``tree``, then replace ``tree`` - only if every leaf got a value."""
        if save_path is None:
            return InitializationOnlyStatus()
        flat = flatten(self.tree)
        graph = _Graph(to_graph(flat, for_restore=True))
        object.__setattr__(self, "_graph", graph)
        try:
            status = super()._restore(save_path, options, expect_save_counter=expect_save_counter)
            assert isinstance(status, CheckpointLoadStatus)
            try:
                status.assert_existing_objects_matched()
            except AssertionError as exc:
                raise CheckpointMismatchError(f"cannot restore the tree from {save_path}: {exc}; the tree was "
                                              f"not replaced") from None
        finally:
            object.__setattr__(self, "_graph", None)
        object.__setattr__(self, "tree", from_graph(_top_values(graph), flat))
        return status


def save(path: CheckpointPath, tree: Any, options: CheckpointOptions | None = None) -> str:
    """Save ``tree`` as the checkpoint ``path`` (``"s3://bucket/run/step-100"``: ``step-100`` in
    ``s3://bucket/run``), replacing one there atomically; return ``path``.

    Every process of a multi-process job calls it with its own shards (a collective).
    Synchronous: use ``PyTreeCheckpoint`` with ``CheckpointOptions(enable_async=True)`` for
    background saves.
    """
    if options is not None and options.enable_async:
        raise ValueError("cloudckpt.jax.save is synchronous (options.enable_async=True): save through a "
                         "PyTreeCheckpoint, whose sync() waits for a background save")
    ckpt = PyTreeCheckpoint(tree)
    return ckpt.write(path, options)


def restore(path: CheckpointPath, like: Any, options: CheckpointOptions | None = None) -> Any:
    """A new tree of ``like``'s structure holding the checkpoint ``path``'s values.

    ``like``'s ``jax.Array`` leaves (or ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``)
    say where each array goes: each process reads only the byte ranges of the boxes its
    devices hold, whatever mesh the checkpoint was written from. Other leaves (numpy
    arrays, scalars, ``None``) come back as their own kind; ``like`` is not modified.

    Raises:
        CheckpointNotFoundError: nothing committed at ``path``.
        CheckpointMismatchError: a leaf of ``like`` has no value in the checkpoint, or a
            stored shape or dtype differs (naming the key path).
    """
    ckpt = PyTreeCheckpoint(like)
    status = ckpt.read(path, options)
    if isinstance(status, CheckpointLoadStatus):
        status.expect_partial()
    return ckpt.tree

