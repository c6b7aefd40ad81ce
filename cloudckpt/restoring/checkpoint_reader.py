"""Reading a checkpoint without restoring it: ``tf.train.list_variables`` and friends.

Each call fetches the index and then only the bytes of the values asked for, so
inspecting one array of a large checkpoint on S3 costs two small GETs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, ValueEntry, parse_dtype
from cloudckpt.format.sniff import ForeignCheckpoint, load_any_index
from cloudckpt.restoring.assign import RestoreSession
from cloudckpt.storage import CheckpointPath, resolve


class CheckpointReader:
    """One checkpoint opened for reading (``tf.train.load_checkpoint``).

    Keys are the checkpoint's key paths (``model/layers/0/kernel``); a key naming an
    inner node (``model``) loads that whole subtree as nested dicts/lists.

    A TensorFlow checkpoint (told apart by its ``.index`` bytes) is read too, by
    ``cloudckpt.tfbundle`` (registered with ``cloudckpt.format.sniff``): keys are then its object
    paths or raw bundle keys, and ``restore`` is not supported (docs/tensorflow-import.md).
    """

    def __init__(self, save_path: CheckpointPath) -> None:
        location = resolve(save_path)
        loaded = load_any_index(location.storage, location.name)
        self._tf = loaded.reader if isinstance(loaded, ForeignCheckpoint) else None
        if isinstance(loaded, CheckpointIndex):
            self._session = RestoreSession(location.storage, loaded)

    @property
    def metadata(self) -> dict[str, Any]:
        """User metadata recorded in the index (e.g. by ``CheckpointManager.save``); none in a TF checkpoint."""
        if self._tf is not None:
            return {}
        return dict(self._session.index.metadata)

    def _leaves(self) -> dict[str, ArrayEntry | ValueEntry]:
        return {p: e for p, e in self._session.index.entries.items() if not isinstance(e, NodeEntry)}

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        """Every leaf key and its shape (``[]`` for scalars and inline values)."""
        if self._tf is not None:
            return self._tf.get_variable_to_shape_map()
        return {p: list(e.shape) if isinstance(e, ArrayEntry) else [] for p, e in self._leaves().items()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype[Any] | type]:
        """Every leaf key and its dtype (the Python type for inline values)."""
        if self._tf is not None:
            return self._tf.get_variable_to_dtype_map()
        out: dict[str, np.dtype[Any] | type] = {}
        for path, entry in self._leaves().items():
            out[path] = parse_dtype(entry.dtype) if isinstance(entry, ArrayEntry) else type(entry.value)
        return out

    def has_tensor(self, name: str) -> bool:
        if self._tf is not None:
            return self._tf.has_tensor(name)
        return name in self._session.index.entries

    def get_tensor(self, name: str) -> Any:
        """The value at ``name`` (fetching only its bytes); ``KeyError`` if absent."""
        if self._tf is not None:
            return self._tf.get_tensor(name)
        if name not in self._session.index.entries:
            raise KeyError(f"{name!r} is not in checkpoint {self._session.url}")
        return self._session.materialize(name)

    def restore(self, name: str, target: Any) -> None:
        """Restore the subtree at ``name`` into ``target``, in place, fetching only its bytes.

        ``target`` must be mutable at its top (an array, ``Variable``, container,
        ``Trackable`` or ``state_dict`` object). Shapes and dtypes are validated first,
        as in ``Checkpoint.restore``.
        """
        if self._tf is not None:
            self._tf.restore(name, target)
            return
        if name not in self._session.index.entries:
            raise KeyError(f"{name!r} is not in checkpoint {self._session.url}")
        self._session.restore(name, target, None)


def load_checkpoint(save_path: CheckpointPath) -> CheckpointReader:
    """Open a checkpoint for reading (``tf.train.load_checkpoint``)."""
    return CheckpointReader(save_path)


def list_variables(save_path: CheckpointPath) -> list[tuple[str, list[int]]]:
    """``(key, shape)`` of every value in the checkpoint, sorted (``tf.train.list_variables``)."""
    return sorted(load_checkpoint(save_path).get_variable_to_shape_map().items())


def load_variable(save_path: CheckpointPath, name: str) -> Any:
    """One value (or subtree) of a checkpoint (``tf.train.load_variable``)."""
    return load_checkpoint(save_path).get_tensor(name)
