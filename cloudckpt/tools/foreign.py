"""Any foreign checkpoint a registered reader opens, as the tools handle it: open, describe, size, verify.

``cloudckpt.format.sniff`` opens a checkpoint in whichever format it is in: cloudckpt's index,
a TensorFlow bundle (``.index`` bytes), or a directory layout a reader registered (torch
DCP's ``<name>/.metadata``, Orbax's ``<name>/_CHECKPOINT_METADATA``). TensorFlow bundles keep
their own, richer handling (``cloudckpt.tfbundle.Bundle``: shards, per-tensor CRC32Cs); every
other format goes through what a ``ForeignCheckpoint`` always has - its objects and its
``VariableReader`` - so a newly registered format works in ``ls``, ``inspect``, ``verify``,
``cp`` and ``export`` without the tools knowing it.

Such formats record no checksum cloudckpt can check (torch DCP's and Orbax's have none), so
``verify`` of one checks what can be checked: every object its metadata names is there, and
every tensor reads back whole (in bounds, decodable), one tensor in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudckpt.errors import NotFoundError
from cloudckpt.format import CheckpointIndex
from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat, find_directory_layout, load_any_index
from cloudckpt.storage import Storage
from cloudckpt.tfbundle import Bundle

#: Largest 0-d tensor whose value ``inspect`` shows.
SCALAR_BYTES = 64


def open_checkpoint(storage: Storage, name: str) -> CheckpointIndex | Bundle | ForeignCheckpoint:
    """Checkpoint ``name`` in whichever format it is in; a TensorFlow one as its :class:`Bundle`.

    Raises:
        CheckpointNotFoundError: no ``.index`` and no registered directory layout at ``<name>/``.
        CheckpointFormatError: the index or the foreign metadata is malformed.
    """
    found = load_any_index(storage, name)
    if isinstance(found, ForeignCheckpoint) and isinstance(found.source, Bundle):
        return found.source
    return found


def is_directory_checkpoint(storage: Storage, name: str) -> bool:
    """Whether ``<name>/`` is a registered directory layout (one HEAD per registered layout)."""
    return bool(name.strip("/")) and find_directory_layout(storage, name) is not None


def format_name(kind: IndexFormat) -> str:
    """How JSON documents and ``ls`` name a format: ``torch-dcp``, ``orbax``."""
    return kind.name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class ForeignTensor:
    """One tensor of a foreign checkpoint, from its reader's maps."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def foreign_tensors(foreign: ForeignCheckpoint) -> tuple[ForeignTensor, ...]:
    """Every tensor the reader names, sorted (dtypes as numpy names; ``object`` where there is none)."""
    shapes = foreign.reader.get_variable_to_shape_map()
    dtypes = foreign.reader.get_variable_to_dtype_map()
    out = []
    for name in sorted(shapes):
        dtype = dtypes.get(name)
        shape = tuple(int(n) for n in shapes[name])
        if isinstance(dtype, np.dtype):
            out.append(ForeignTensor(name, dtype.name, shape, math.prod(shape) * dtype.itemsize))
        else:
            out.append(ForeignTensor(name, getattr(dtype, "__name__", "object"), shape, 0))
    return tuple(out)


def object_sizes(storage: Storage, foreign: ForeignCheckpoint) -> dict[str, int | None]:
    """Each object the checkpoint names and its size by HEAD (``None``: missing), in parallel."""
    names = sorted(foreign.objects)

    def size(key: str) -> int | None:
        try:
            return storage.head(key).size
        except NotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(size, names), strict=True))


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        item = np.asarray(value).reshape(()).item()
        return str(item) if isinstance(item, float) and not math.isfinite(item) else item
    return value if isinstance(value, bool | int | str) else str(value)


@dataclass(frozen=True, slots=True)
class ForeignInfo:
    """A foreign checkpoint as ``cloudckpt inspect`` shows it.

    Attributes:
        checkpoint: the opened checkpoint (format, objects, reader).
        tensors: what it holds, by name.
        values: the values of its small 0-d tensors, by name (empty when not fetched).
        sizes: its objects' sizes (``None``: missing).
    """

    checkpoint: ForeignCheckpoint
    tensors: tuple[ForeignTensor, ...]
    values: Mapping[str, Any]
    sizes: Mapping[str, int | None]

    @property
    def url(self) -> str:
        return self.checkpoint.url

    @property
    def description(self) -> str:
        return f"{self.checkpoint.format.value} ({len(self.sizes)} object(s))"

    def to_json(self) -> dict[str, Any]:
        """``cloudckpt inspect --json``'s document for a foreign checkpoint."""
        entries = []
        for tensor in self.tensors:
            doc: dict[str, Any] = {"key": tensor.name, "kind": "array", "dtype": tensor.dtype,
                                   "shape": list(tensor.shape), "size": tensor.nbytes}
            if tensor.name in self.values:
                doc["value"] = self.values[tensor.name]
            entries.append(doc)
        return {"checkpoint": self.url, "format": format_name(self.checkpoint.format),
                "objects": [{"name": k, "size": v} for k, v in self.sizes.items()], "entries": entries}


def inspect_foreign(storage: Storage, foreign: ForeignCheckpoint, *, values: bool) -> ForeignInfo:
    """Describe ``foreign``: its tensors from the reader's maps, its objects by HEAD, and small scalars' values."""
    tensors = foreign_tensors(foreign)
    shown = {t.name: _json_scalar(foreign.reader.get_tensor(t.name)) for t in tensors
             if values and t.shape == () and 0 < t.nbytes <= SCALAR_BYTES}
    return ForeignInfo(foreign, tensors, shown, object_sizes(storage, foreign))
