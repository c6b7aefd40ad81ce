"""Which format a checkpoint is in, told from its ``.index`` bytes, and the seam foreign readers plug into.

A checkpoint path may hold cloudckpt's own index (a JSON object) or another framework's
checkpoint: TensorFlow's TensorBundle writes ``<name>.index`` too - a LevelDB-style table
that ends in a magic number. Other frameworks write a *directory* instead (torch DCP's
``<name>/.metadata`` + ``.distcp`` files, Orbax's ``<name>/_CHECKPOINT_METADATA`` + OCDBT): when
``<name>.index`` is absent, the directory layouts registered with :func:`register_directory_reader`
are probed by their marker object. Deciding *which* is format knowledge and lives here, by
content and marker, never by the checkpoint's name.
*Reading* a foreign format is an integration's job: ``cloudckpt.tfbundle`` sits above the
core and registers its reader with :func:`register_reader` when it is imported (the package
``cloudckpt`` imports it, so every user of the core sees it registered), and the core
(``Checkpoint``, ``CheckpointReader``, ``references``, ``remove_checkpoint``) only ever
handles the :class:`ForeignCheckpoint` it gets back - it never imports the reader.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format.decode import decode_index
from cloudckpt.format.entries import CheckpointIndex
from cloudckpt.format.index_fetch import index_not_found, read_decoded
from cloudckpt.format.naming import index_key
from cloudckpt.storage import Storage

#: TensorFlow's table footer: two block handles padded to 40 bytes, then this magic number.
TF_TABLE_MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)
TF_FOOTER_SIZE = 48


class IndexFormat(enum.Enum):
    """A checkpoint format an ``.index`` object can be in (the value is how messages name it)."""

    CLOUDCKPT = "cloudckpt index"
    TENSORFLOW = "TensorFlow bundle"
    TORCH_DCP = "torch DCP checkpoint"
    ORBAX = "Orbax checkpoint"


def looks_like_tf_table(data: bytes) -> bool:
    """Whether ``data`` ends like a TensorFlow table (the footer's magic number)."""
    return len(data) >= TF_FOOTER_SIZE and data[-8:] == TF_TABLE_MAGIC


def sniff_index(data: bytes) -> IndexFormat | None:
    """The format of an ``.index`` object's bytes; ``None`` for neither (truncated, or not a checkpoint).

    cloudckpt's index is a JSON object (it starts with ``{``); TensorFlow's is a table
    that ends in its magic number. Only the first and last bytes are looked at: whether
    the index is *valid* is for its reader to say.
    """
    if data.lstrip()[:1] == b"{":
        return IndexFormat.CLOUDCKPT
    if looks_like_tf_table(data):
        return IndexFormat.TENSORFLOW
    return None


class VariableReader(Protocol):
    """The read-only methods of ``cloudckpt.CheckpointReader`` a foreign checkpoint offers."""

    def get_variable_to_shape_map(self) -> dict[str, list[int]]: ...

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype[Any] | type]: ...

    def has_tensor(self, name: str) -> bool: ...

    def get_tensor(self, name: str) -> Any: ...

    def restore(self, name: str, target: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class ForeignCheckpoint:
    """A checkpoint of another framework's format, opened (and validated) by its registered reader.

    Attributes:
        format: which format it is.
        url: the checkpoint's URL (as messages name it).
        objects: the data objects its index names (what deletion must leave alone).
        reader: its tensors, behind ``CheckpointReader``'s methods.
        source: the integration's own object (a ``cloudckpt.tfbundle.Bundle``), for code above the core.
    """

    format: IndexFormat
    url: str
    objects: frozenset[str]
    reader: VariableReader
    source: object


#: Opens a foreign checkpoint from its storage, name and ``.index`` bytes (raises CheckpointFormatError).
Opener = Callable[[Storage, str, bytes], ForeignCheckpoint]

#: Opens a foreign checkpoint laid out as a directory ``<name>/`` from its storage and name.
DirectoryOpener = Callable[[Storage, str], ForeignCheckpoint]


@dataclass(frozen=True, slots=True)
class DirectoryLayout:
    """A foreign format that is a directory ``<name>/``, recognised by one marker object in it.

    Attributes:
        kind: the format.
        marker: the object under ``<name>/`` whose presence says "this layout" (torch DCP: ``.metadata``).
        opener: reads and validates the checkpoint (raises CheckpointFormatError).
    """

    kind: IndexFormat
    marker: str
    opener: DirectoryOpener


_READERS: dict[IndexFormat, Opener] = {}
_LAYOUTS: dict[IndexFormat, DirectoryLayout] = {}


def register_reader(kind: IndexFormat, opener: Opener) -> None:
    """Make checkpoints of format ``kind`` readable by the core through ``opener`` (replacing any earlier one)."""
    if kind is IndexFormat.CLOUDCKPT:
        raise ValueError("cloudckpt's own index is read by the core, not by a registered reader")
    _READERS[kind] = opener


def register_directory_reader(kind: IndexFormat, marker: str, opener: DirectoryOpener) -> None:
    """Make directory checkpoints of format ``kind`` (marked by ``<name>/<marker>``) readable through ``opener``."""
    if kind in (IndexFormat.CLOUDCKPT, IndexFormat.TENSORFLOW):
        raise ValueError(f"a {kind.value} is an .index object, not a directory layout")
    if not marker or "/" in marker:
        raise ValueError(f"a directory layout's marker is one object name, not {marker!r}")
    _LAYOUTS[kind] = DirectoryLayout(kind, marker, opener)


def find_directory_layout(storage: Storage, name: str) -> DirectoryLayout | None:
    """The registered directory layout ``<name>/`` is in (one HEAD per registered layout), or ``None``."""
    base = name.rstrip("/")
    for layout in _LAYOUTS.values():
        if storage.exists(f"{base}/{layout.marker}"):
            return layout
    return None


def load_any_index(storage: Storage, name: str) -> CheckpointIndex | ForeignCheckpoint:
    """Checkpoint ``name``'s index, whichever format it is in: cloudckpt's, or a registered foreign one.

    One HEAD and one GET of the ``.index`` object; the format is told from its bytes. Only
    when there is no ``.index`` are the registered directory layouts probed (one HEAD each).

    Raises:
        CheckpointNotFoundError: no index, and no registered directory layout at ``<name>/``.
        CheckpointFormatError: the bytes are no known format (a truncated TensorFlow index
            has lost its magic number), no reader is registered for theirs, or the index
            they hold is malformed.
    """
    found = read_decoded(storage, name, lambda data: _decode_any(storage, name, data))
    if found is not None:
        return found
    layout = find_directory_layout(storage, name) if _LAYOUTS else None
    if layout is None:
        raise index_not_found(storage, name)
    return layout.opener(storage, name.rstrip("/"))


def _decode_any(storage: Storage, name: str, data: bytes) -> CheckpointIndex | ForeignCheckpoint:
    """The index in ``data``, told by its bytes: cloudckpt's, or a registered reader's."""
    url = storage.url_for(index_key(name))
    kind = sniff_index(data)
    if kind is IndexFormat.CLOUDCKPT:
        return decode_index(data, name, url)
    if kind is None:
        raise CheckpointFormatError(
            f"{url} is not a checkpoint index: neither cloudckpt's (JSON) nor TensorFlow's (a table ending in "
            f"its magic number); {len(data)} bytes - truncated, or not a checkpoint")
    opener = _READERS.get(kind)
    if opener is None:
        raise CheckpointFormatError(f"{url} is a {kind.value}, and no reader for it is registered", url)
    return opener(storage, name, data)
