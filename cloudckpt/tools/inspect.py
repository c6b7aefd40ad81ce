"""``inspect_checkpoint``: what a checkpoint holds, from its index alone (plus its small scalars).

Everything but the values of small 0-d arrays comes from the index (one GET). Those values
(``save_counter``, a step ``Variable``) are what people look for first, so they are fetched
too - in one coalesced ranged read, CRC32C-checked like any restore. A TensorFlow checkpoint
is described by its bundle (tensors by object path and raw key); any other registered foreign
format (torch DCP's layout, ...) by its reader (``ForeignInfo``: tensors by name, its objects).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, ValueEntry, parse_dtype
from cloudckpt.format.sniff import ForeignCheckpoint
from cloudckpt.restoring.array_reads import read_arrays
from cloudckpt.restoring.buffers import ReadTarget, new_buffer
from cloudckpt.storage import CheckpointPath, Storage, resolve
from cloudckpt.tfbundle import Bundle, Tensor, tensor_value
from cloudckpt.tools.foreign import ForeignInfo, inspect_foreign, open_checkpoint

#: Largest array (or tensor) whose value is fetched (0-d arrays are a few bytes each).
_SCALAR_BYTES = 64
#: How a TensorFlow checkpoint's format is named in JSON documents.
TF_FORMAT = "tensorflow"


def array_nbytes(entry: ArrayEntry) -> int:
    return math.prod(entry.shape) * parse_dtype(entry.dtype).itemsize


def json_value(value: Any) -> Any:
    """A value as strict JSON (non-finite floats as strings, as the index stores them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def scalar_values(storage: Storage, index: CheckpointIndex) -> dict[str, Any]:
    """The values of 0-d arrays (one coalesced ranged read, CRC32C checked)."""
    targets = []
    for path, entry in index.entries.items():
        if isinstance(entry, ArrayEntry) and entry.shape == () and array_nbytes(entry) <= _SCALAR_BYTES:
            targets.append(ReadTarget(path, entry, new_buffer(entry), live=False))
    if not targets:
        return {}
    read_arrays(storage, index, targets)
    out: dict[str, Any] = {}
    for target in targets:
        value = target.dest[()]
        out[target.path] = value.item() if hasattr(value, "item") and target.dest.dtype.kind in "biuf" else str(value)
    return out


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A cloudckpt checkpoint as ``cloudckpt inspect`` shows it.

    Attributes:
        url: the checkpoint's URL.
        name: its name in its directory (``ckpt-7``).
        index: its validated index (keys, dtypes, shapes, chunks, metadata).
        values: the values of its small 0-d arrays, by key (empty when not fetched).
    """

    url: str
    name: str
    index: CheckpointIndex
    values: Mapping[str, Any]

    @property
    def leaves(self) -> dict[str, ArrayEntry | ValueEntry]:
        """Every array and inline value, by key path (inner nodes left out)."""
        return {p: e for p, e in self.index.entries.items() if not isinstance(e, NodeEntry)}

    @property
    def data_bytes(self) -> int:
        return sum(o.size for o in self.index.objects)

    @property
    def new_bytes(self) -> int:
        """Bytes in this checkpoint's own data objects (the rest it references in earlier ones)."""
        return self.index.bytes_by_checkpoint().get(self.name, 0)

    @property
    def shared_bytes(self) -> dict[str, int]:
        """Bytes referenced in earlier checkpoints' objects, by checkpoint name (incremental saves)."""
        return dict(sorted((k, v) for k, v in self.index.bytes_by_checkpoint().items() if k != self.name))

    def to_json(self) -> dict[str, Any]:
        """``cloudckpt inspect --json``'s document."""
        index = self.index
        return {"checkpoint": self.url, "name": self.name, "format_version": index.version,
                "metadata": dict(index.metadata), "data_bytes": self.data_bytes,
                "new_bytes": self.new_bytes, "shared_bytes": self.shared_bytes,
                "objects": [{"name": o.name, "size": o.size} for o in index.objects],
                "entries": [self._entry_json(p, e) for p, e in self.leaves.items()]}

    def _entry_json(self, path: str, entry: ArrayEntry | ValueEntry) -> dict[str, Any]:
        if isinstance(entry, ValueEntry):
            return {"key": path, "kind": "value", "type": entry.type, "value": json_value(entry.value)}
        doc: dict[str, Any] = {"key": path, "kind": "array", "dtype": entry.dtype, "shape": list(entry.shape),
                               "size": array_nbytes(entry), "pytype": entry.pytype}
        if path in self.values:
            doc["value"] = json_value(self.values[path])
        doc["chunks"] = [{"object": self.index.objects[c.object].name, "offset": c.offset, "length": c.length,
                          "crc32c": c.crc32c, "start": list(c.start), "shape": list(c.shape)} for c in entry.chunks]
        return doc


def _json_scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        item = value.item()
        return str(item) if isinstance(item, float) and not np.isfinite(item) else item
    return str(value)


def bundle_scalar_values(bundle: Bundle, tensors: tuple[Tensor, ...]) -> dict[str, Any]:
    """The values of small 0-d tensors (``save_counter``, a step), in one coalesced read."""
    small = [t.name for t in tensors if t.shape == () and t.numpy_dtype is not None and t.nbytes <= _SCALAR_BYTES]
    return {name: _json_scalar(tensor_value(value)) for name, value in bundle.read(small).items()} if small else {}


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """A TensorFlow checkpoint as ``cloudckpt inspect`` shows it.

    Attributes:
        bundle: the opened bundle (its header, entries and object graph validated).
        tensors: what it holds, by object path (and raw key).
        values: the values of its small 0-d tensors, by name (empty when not fetched).
    """

    bundle: Bundle
    tensors: tuple[Tensor, ...]
    values: Mapping[str, Any]

    @property
    def url(self) -> str:
        return self.bundle.url

    @property
    def description(self) -> str:
        header = self.bundle.header
        return (f"TensorFlow TensorBundle ({header.num_shards} shard(s), "
                f"{'big' if header.big_endian else 'little'}-endian)")

    def to_json(self) -> dict[str, Any]:
        """``cloudckpt inspect --json``'s document for a TensorFlow checkpoint."""
        bundle = self.bundle
        return {"checkpoint": bundle.url, "name": bundle.name, "format": TF_FORMAT,
                "num_shards": bundle.header.num_shards, "big_endian": bundle.header.big_endian,
                "objects": [bundle.objects[i] for i in range(bundle.header.num_shards)],
                "entries": [self._entry_json(t) for t in self.tensors]}

    def _entry_json(self, tensor: Tensor) -> dict[str, Any]:
        entry = self.bundle.entries[tensor.key]
        doc: dict[str, Any] = {"key": tensor.name, "tensorflow_key": tensor.key, "kind": "array",
                               "dtype": tensor.dtype, "shape": list(tensor.shape), "size": tensor.nbytes}
        if tensor.name in self.values:
            doc["value"] = self.values[tensor.name]
        if not entry.slices:
            doc["shard"], doc["offset"], doc["crc32c"] = entry.shard, entry.offset, entry.crc32c
        else:
            doc["slices"] = len(entry.slices)
        return doc


def inspect_checkpoint(path: CheckpointPath, *, values: bool = True) -> CheckpointInfo | BundleInfo | ForeignInfo:
    """What the checkpoint at ``path`` holds (``cloudckpt inspect``): its index, and small scalars' values.

    Args:
        path: a checkpoint path or URL (``s3://bucket/run/ckpt-7``) or ``Location``.
        values: fetch the values of small 0-d arrays (one ranged read, CRC32C checked).

    Raises:
        CheckpointNotFoundError: no checkpoint there. CheckpointFormatError: its index is malformed.
        ChecksumError: a fetched scalar's bytes fail their CRC32C.
    """
    location = resolve(path)
    storage, name = location.storage, location.name
    index = open_checkpoint(storage, name)
    if isinstance(index, Bundle):
        tensors = tuple(index.tensors())
        return BundleInfo(index, tensors, bundle_scalar_values(index, tensors) if values else {})
    if isinstance(index, ForeignCheckpoint):
        return inspect_foreign(storage, index, values=values)
    return CheckpointInfo(storage.url_for(name), name, index, scalar_values(storage, index) if values else {})
