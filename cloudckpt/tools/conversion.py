"""What a foreign checkpoint becomes in cloudckpt's format: pieces to write, values, and extra index fields.

``cloudckpt cp`` converts any checkpoint a registered foreign reader opens (a
``cloudckpt.format.sniff.ForeignCheckpoint``: torch DCP's layout, Orbax, ...) into cloudckpt's
own format. The converter (``copy_foreign``) needs to know, before it reads a byte, every
piece it will write - its key path, dtype, global shape, box and size - so it can plan the
data objects and keep memory bounded by one object's worth of pieces; it then loads each
piece only when its object is written.

A reader that knows its layout offers ``conversion()`` returning a :class:`Conversion`
(torch DCP keeps its chunks and byte items, and the ``dcp`` field that makes the copy
loadable by ``cloudckpt.dcp.StorageReader``). Any other reader is converted through
``VariableReader`` alone (:func:`default_conversion`): one piece per tensor, loaded with
``get_tensor``, its name split on ``/`` into nested key paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.format import ArrayPyType, NodeEntry, ValueEntry, dtype_name, encode_segment, parse_dtype
from cloudckpt.format.sniff import ForeignCheckpoint, VariableReader


@dataclass(frozen=True, slots=True)
class Piece:
    """One box of one array, as the converted index will record it.

    Attributes:
        path: the key path in the converted index (segments encoded).
        pytype: what a restore rebuilds (``ndarray``; ``tensor`` for torch; ``bytes`` for an opaque item).
        dtype: the index's dtype name of the whole array.
        shape: the array's global shape.
        start / box: this piece's offsets into it and its shape.
        load: reads the piece's values (C-contiguous, ``box``-shaped, of ``dtype``); called once.
    """

    path: str
    pytype: ArrayPyType
    dtype: str
    shape: tuple[int, ...]
    start: tuple[int, ...]
    box: tuple[int, ...]
    load: Callable[[], NDArray[Any]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.box) * parse_dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class Conversion:
    """Everything the converted index holds.

    Attributes:
        pieces: every array's pieces (an array's pieces tile it).
        nodes: inner nodes by key path (``""``, the root, included).
        values: inline values by key path.
        dcp: the index's ``dcp`` field (torch DCP's metadata as JSON), or ``None``.
    """

    pieces: tuple[Piece, ...]
    nodes: Mapping[str, NodeEntry]
    values: Mapping[str, ValueEntry] = field(default_factory=dict)
    dcp: Mapping[str, Any] | None = None


def tree_nodes(paths: list[str]) -> dict[str, NodeEntry]:
    """The inner nodes of leaves at ``paths``: the root an ``object`` (as ``Checkpoint``'s), the rest ``dict``s."""
    children: dict[str, list[str]] = {"": []}
    for path in paths:
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            kids = children.setdefault(parent, [])
            if parts[depth] not in kids:
                kids.append(parts[depth])
    return {p: NodeEntry("object" if p == "" else "dict", tuple(kids)) for p, kids in children.items()}


def name_path(name: str) -> str:
    """A foreign tensor name as a key path: ``params/dense/kernel`` nests, each segment encoded."""
    return "/".join(encode_segment(part) for part in name.split("/"))


def default_conversion(reader: VariableReader) -> Conversion:
    """One piece per tensor, loaded through ``get_tensor``; names nest on ``/``.

    Raises:
        ValueError: two names give one key path, or a name is both a tensor and a prefix of another.
    """
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    pieces: list[Piece] = []
    seen: dict[str, str] = {}
    for name in sorted(shapes):
        dtype = dtypes.get(name)
        if not isinstance(dtype, np.dtype) or dtype.kind in "OUS":
            continue  # strings and objects have no array form here (export reads TensorFlow's)
        path = name_path(name)
        if path in seen:
            raise ValueError(f"tensors {seen[path]!r} and {name!r} would both be key path {path!r}")
        seen[path] = name
        shape = tuple(int(n) for n in shapes[name])
        pieces.append(Piece(path, "ndarray", dtype_name(dtype), shape, (0,) * len(shape), shape,
                            _loader(reader, name, dtype, shape)))
    nodes = tree_nodes([p.path for p in pieces])
    clash = next((p.path for p in pieces if p.path in nodes), None)
    if clash is not None:
        raise ValueError(f"{seen[clash]!r} is a tensor and also the prefix of other tensors' names")
    return Conversion(tuple(pieces), nodes)


def _loader(reader: VariableReader, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]
            ) -> Callable[[], NDArray[Any]]:
    def load() -> NDArray[Any]:
        value = np.asarray(reader.get_tensor(name), order="C")
        if value.dtype != dtype or value.shape != shape:
            raise ValueError(f"{name}: the reader returned {value.dtype}{list(value.shape)}, "
                             f"its maps say {dtype}{list(shape)}")
        return value
    return load


def conversion_of(foreign: ForeignCheckpoint) -> Conversion:
    """The reader's own ``conversion()`` where it has one, else :func:`default_conversion`."""
    own = getattr(foreign.reader, "conversion", None)
    if callable(own):
        result = own()
        assert isinstance(result, Conversion), f"{type(foreign.reader).__name__}.conversion() returned {result!r}"
        return result
    return default_conversion(foreign.reader)
