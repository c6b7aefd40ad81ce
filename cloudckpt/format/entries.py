"""The index model: format version, limits a hostile index cannot exceed, and the entries
(arrays, JSON values, containers), data objects and ``CheckpointIndex`` a decoded index is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from cloudckpt.format.chunks import Chunk
from cloudckpt.format.naming import object_checkpoint

#: Bump on any change a reader of the previous version could misread (docs/format.md has each).
#: Version 2 added references (incremental saves), the ``bytes`` array pytype and the optional
#: top-level ``dcp`` field (torch.distributed.checkpoint's metadata). Version 3 writes a
#: chunk's ``blocks.crc32c`` little-endian, as a grid's always were (``chunks.BLOCKS_LITTLE_ENDIAN_SINCE``).
FORMAT_VERSION = 3
#: Versions this reader understands; every earlier version stays readable.
READABLE_VERSIONS = frozenset({1, 2, 3})
FORMAT_NAME = "cloudckpt-index"


#: Sanity bounds a hostile index cannot exceed (far above anything real).
MAX_NDIM = 64
MAX_BYTES = 2**53
MAX_CHUNKS_PER_ARRAY = 1 << 16
#: Longest key path (characters): the only bound on nesting depth (walks are iterative).
MAX_KEY_PATH = 1 << 16
MAX_ITEMSIZE = 1 << 20

#: Types of JSON leaves (small Python values stored inline in the index).
ValueType = Literal["none", "bool", "int", "float", "str"]
#: What Python type an array leaf had, so restore can rebuild it (a tensor stays a tensor).
#: ``bytes``: an opaque byte string (1-D uint8), handed back as ``bytes`` and never
#: interpreted (torch.distributed.checkpoint's serialized non-tensor items).
ArrayPyType = Literal["ndarray", "variable", "numpy_scalar", "tensor", "bytes"]
#: Container kinds of inner nodes.
NodeType = Literal["object", "dict", "list", "tuple"]

VALUE_TYPES: frozenset[str] = frozenset({"none", "bool", "int", "float", "str"})
ARRAY_PYTYPES: frozenset[str] = frozenset({"ndarray", "variable", "numpy_scalar", "tensor", "bytes"})
NODE_TYPES: frozenset[str] = frozenset({"object", "dict", "list", "tuple"})
#: Adapters that turn an object's state into a structure and back (see adapters/).
ADAPTERS: frozenset[str] = frozenset({"state_dict", "numpy_generator", "python_random", "torch_generator"})


# ---------------------------------------------------------------------------- index model
@dataclass(frozen=True, slots=True)
class ArrayEntry:
    """An array leaf: dtype, global shape, Python type to rebuild, and its chunks.

    ``chunks`` is a tuple of ``Chunk``, or (many shards on a grid, version 2) a ``ChunkGrid``:
    the same ``Sequence[Chunk]`` to a reader, kept as columns (``cloudckpt.format.chunks``).
    """

    dtype: str
    shape: tuple[int, ...]
    pytype: ArrayPyType
    chunks: Sequence[Chunk]


@dataclass(frozen=True, slots=True)
class ValueEntry:
    """A small Python value stored inline (NaN and infinities survive)."""

    type: ValueType
    value: Any


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """An inner node: a container or a trackable object, with its children's segments.

    ``adapter`` names how a live object produces and accepts this structure as a whole
    (``state_dict`` objects, random-number generators); ``None`` for plain containers
    and trackables, whose children are matched one by one.
    """

    type: NodeType
    children: tuple[str, ...]
    adapter: str | None = None


Entry = Union[ArrayEntry, ValueEntry, NodeEntry]  # noqa: UP007 - runtime alias on 3.10


@dataclass(frozen=True, slots=True)
class DataObject:
    """One data object of the checkpoint: its key (relative to the directory) and size."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class CheckpointIndex:
    """A whole parsed index. ``entries`` maps key paths to entries; ``""`` is the root.

    ``references`` (version 2) names the other checkpoints whose data objects this index
    also names: an incremental save reuses unchanged bytes where they already are.
    """

    name: str
    entries: Mapping[str, Entry]
    objects: tuple[DataObject, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    references: tuple[str, ...] = ()
    #: What torch.distributed.checkpoint's ``Metadata`` carries beyond the entries (tensor
    #: properties, planner data, ...), as plain JSON; ``None`` for other checkpoints.
    #: Only ``cloudckpt.dcp`` interprets it (and validates it when it does).
    dcp: Mapping[str, Any] | None = None

    def owned_objects(self) -> tuple[DataObject, ...]:
        """The data objects this checkpoint's own write made (not the ones it references)."""
        return tuple(o for o in self.objects if object_checkpoint(o.name) == self.name)

    def bytes_by_checkpoint(self) -> dict[str, int]:
        """Array bytes per checkpoint whose objects hold them: this one's new bytes under its
        own name, the bytes an incremental save reused under the checkpoints that wrote them."""
        out: dict[str, int] = {}
        for entry in self.entries.values():
            if isinstance(entry, ArrayEntry):
                for c in entry.chunks:
                    owner = object_checkpoint(self.objects[c.object].name) or self.name
                    out[owner] = out.get(owner, 0) + c.length
        return out


def referenced_checkpoints(name: str, objects: Sequence[DataObject]) -> tuple[str, ...]:
    """The other checkpoints whose objects ``objects`` include, sorted (an index's ``references``)."""
    return tuple(sorted({c for o in objects if (c := object_checkpoint(o.name)) is not None and c != name}))
