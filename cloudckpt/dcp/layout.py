"""torch DCP's own checkpoints read from any cloudckpt store: ``FileSystemWriter`` / ``FsspecWriter`` directories.

DCP's storage layer writes a checkpoint as a directory: ``__<rank>_<n>.distcp`` files holding
each item's bytes - a tensor chunk as a ``torch.save`` archive, a non-tensor item as the
bytes DCP's planner serialized - and, last, ``.metadata``: DCP's ``Metadata`` pickled, with
``storage_data`` saying which file and byte range holds each item. This module reads that
layout without torch's storage reader, so it works on every cloudckpt store (local, S3, GCS,
fsspec) alike:

- the metadata through ``layout_metadata`` (size-capped, allowlisted unpickling);
- each item by one ranged GET of its byte range; a tensor chunk decoded by
  ``torch.load(..., weights_only=True)`` (as ``FileSystemReader.read_data`` does), a byte
  item's value by ``torch.load(..., weights_only=True)`` too (DCP's own load planner uses
  ``weights_only=False`` there; cloudckpt does not);
- a tensor saved in chunks (FSDP / TP shards of many ranks) assembled into its global value.

``cloudckpt/__init__.py`` registers :func:`open_layout` for directories holding ``.metadata``
(importing this module - and torch - only when such a checkpoint is opened), so
``load_variable``, ``CheckpointReader``, ``ls``, ``inspect``, ``verify``, ``cp`` and
``export`` read it. ``cp`` keeps its chunks and byte items and records DCP's metadata as JSON
(``conversion``), so ``dcp.load(..., storage_reader=cloudckpt.dcp.StorageReader(copy))``
loads the copy as it loaded the original. See docs/dcp.md.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from cloudckpt.adapters import torch as torch_adapter
from cloudckpt.dcp.layout_metadata import METADATA_FILE, read_dcp_metadata
from cloudckpt.dcp.metadata import encode_dcp_field, fqn_path, numpy_dtype, stored_dtype_name
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import NodeEntry
from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat
from cloudckpt.storage import ByteRange, Storage
from cloudckpt.tools.conversion import Conversion, Piece

Box = tuple[tuple[int, ...], tuple[int, ...]]


class DCPLayout:
    """One torch DCP checkpoint directory, opened: its metadata and where each item's bytes are."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.name = name.rstrip("/")
        self.url = storage.url_for(self.name)
        self.metadata: Metadata = read_dcp_metadata(storage, self.name)
        self.items: dict[tuple[str, tuple[int, ...] | None], _StorageInfo] = {}
        assert isinstance(self.metadata.storage_data, dict)
        for index, info in self.metadata.storage_data.items():
            offset = None if index.offset is None else tuple(int(o) for o in index.offset)
            self.items[(index.fqn, offset)] = info
        for fqn, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                for chunk in md.chunks:
                    self._info(fqn, tuple(int(o) for o in chunk.offsets))
            elif isinstance(md, BytesStorageMetadata):
                self._info(fqn, None)
            else:
                raise CheckpointFormatError(f"{self.url}: {fqn!r} is described by a {type(md).__name__}", self.url)
        self.objects = frozenset({f"{self.name}/{METADATA_FILE}",
                                  *(f"{self.name}/{info.relative_path}" for info in self.items.values())})

    def _info(self, fqn: str, offset: tuple[int, ...] | None) -> _StorageInfo:
        info = self.items.get((fqn, offset))
        if info is None:
            where = "" if offset is None else f" (chunk at {list(offset)})"
            raise CheckpointFormatError(f"{self.url}: the metadata says nowhere where {fqn!r}{where} is stored",
                                        self.url)
        if info.transform_descriptors:
            raise CheckpointFormatError(f"{self.url}: {fqn!r} is stored with transforms {info.transform_descriptors}"
                                        f" (compression or encryption extensions), which cloudckpt does not read",
                                        self.url)
        return info

    def raw(self, fqn: str, offset: tuple[int, ...] | None) -> bytes:
        """An item's stored bytes: one ranged GET."""
        info = self._info(fqn, offset)
        if info.length == 0:
            return b""
        return self.storage.get(f"{self.name}/{info.relative_path}",
                                ByteRange.bounded(info.offset, info.offset + info.length))

    def chunk(self, fqn: str, md: TensorStorageMetadata, offset: tuple[int, ...], sizes: tuple[int, ...]
              ) -> NDArray[Any]:
        """One stored chunk of tensor ``fqn`` as a C-contiguous array of its stored dtype."""
        try:
            tensor = torch.load(io.BytesIO(self.raw(fqn, offset)), map_location="cpu", weights_only=True)
        except CheckpointFormatError:
            raise
        except Exception as exc:  # a truncated or foreign archive: torch says what is wrong with it
            raise CheckpointFormatError(f"{self.url}: the chunk of {fqn!r} at {list(offset)} does not load: "
                                        f"{type(exc).__name__}: {exc}", self.url) from exc
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != sizes or \
                tensor.dtype != md.properties.dtype:
            got = f"{tensor.dtype}{list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointFormatError(f"{self.url}: the chunk of {fqn!r} at {list(offset)} is {got}, the metadata "
                                        f"says {md.properties.dtype}{list(sizes)}", self.url)
        return np.asarray(torch_adapter.tensor_to_numpy(tensor.detach().contiguous()), order="C")

    def tensor(self, fqn: str, md: TensorStorageMetadata) -> NDArray[Any]:
        """The global value of tensor ``fqn``, its chunks placed where the metadata says."""
        shape = tuple(int(n) for n in md.size)
        out = np.empty(shape, dtype=numpy_dtype(md.properties.dtype))
        covered = 0
        for chunk in md.chunks:
            start, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(n) for n in chunk.sizes)
            if len(start) != len(shape) or len(sizes) != len(shape) or any(
                    o < 0 or n < 0 or o + n > s for o, n, s in zip(start, sizes, shape, strict=True)):
                raise CheckpointFormatError(f"{self.url}: the chunk of {fqn!r} at {list(start)} of shape "
                                            f"{list(sizes)} lies outside {list(shape)}", self.url)
            out[tuple(slice(o, o + n) for o, n in zip(start, sizes, strict=True))] = self.chunk(fqn, md, start, sizes)
            covered += math.prod(sizes)
        if covered != math.prod(shape):
            raise CheckpointFormatError(f"{self.url}: the chunks of {fqn!r} cover {covered} of its "
                                        f"{math.prod(shape)} elements", self.url)
        return out

    def value(self, fqn: str) -> Any:
        """A non-tensor item's value, loaded with ``weights_only=True`` (plain Python values load)."""
        try:
            return torch.load(io.BytesIO(self.raw(fqn, None)), map_location="cpu", weights_only=True)
        except CheckpointFormatError:
            raise
        except Exception as exc:
            raise CheckpointFormatError(f"{self.url}: the item {fqn!r} does not load with weights_only=True: "
                                        f"{type(exc).__name__}: {exc}", self.url) from exc


class DCPLayoutReader:
    """``CheckpointReader``'s read methods over a :class:`DCPLayout`; names are DCP's keys (FQNs)."""

    def __init__(self, layout: DCPLayout) -> None:
        self.layout = layout

    def _tensors(self) -> dict[str, TensorStorageMetadata]:
        return {f: md for f, md in self.layout.metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)}

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        """Tensors only (byte items have no shape; ``get_tensor`` reads them too)."""
        return {fqn: [int(n) for n in md.size] for fqn, md in self._tensors().items()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype[Any] | type]:
        out: dict[str, np.dtype[Any] | type] = {}
        for fqn, md in self._tensors().items():
            try:
                out[fqn] = numpy_dtype(md.properties.dtype)
            except ValueError:
                out[fqn] = object  # complex32, quantized ...: no numpy twin
        return out

    def has_tensor(self, name: str) -> bool:
        return name in self.layout.metadata.state_dict_metadata

    def get_tensor(self, name: str) -> Any:
        """A tensor's global value (numpy), or a byte item's Python value."""
        md = self.layout.metadata.state_dict_metadata.get(name)
        if md is None:
            raise KeyError(f"{self.layout.url} has no item {name!r}")
        if isinstance(md, TensorStorageMetadata):
            return self.layout.tensor(name, md)
        return self.layout.value(name)

    def restore(self, name: str, target: Any) -> None:
        raise NotImplementedError(
            f"{self.layout.url} is a torch DCP checkpoint: load it into a state_dict with torch's "
            f"dcp.load(state_dict, storage_reader=FileSystemReader(...)), or convert it with cloudckpt cp and load "
            f"the copy with cloudckpt.dcp.StorageReader (docs/dcp.md); get_tensor({name!r}) reads one value")

    def conversion(self) -> Conversion:
        """What ``cp`` writes: every chunk and byte item as DCP stored it, and DCP's metadata as the ``dcp`` field.

        The result is what ``cloudckpt.dcp.StorageWriter`` would have written for the same save.
        """
        layout = self.layout
        pieces: list[Piece] = []
        for fqn, md in layout.metadata.state_dict_metadata.items():
            path = fqn_path(fqn)
            if isinstance(md, TensorStorageMetadata):
                shape = tuple(int(n) for n in md.size)
                dtype = stored_dtype_name(md.properties.dtype)
                for chunk in md.chunks:
                    start, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(n) for n in chunk.sizes)
                    pieces.append(Piece(path, "tensor", dtype, shape, start, sizes,
                                        _chunk_loader(layout, fqn, md, start, sizes)))
            else:
                length = layout._info(fqn, None).length
                pieces.append(Piece(path, "bytes", "uint8", (length,), (0,), (length,), _bytes_loader(layout, fqn)))
        root = NodeEntry("object", tuple(fqn_path(f) for f in layout.metadata.state_dict_metadata))
        plain = dataclasses.replace(layout.metadata, storage_data=None)
        return Conversion(tuple(pieces), {"": root}, dcp=encode_dcp_field(plain, None, None))


def _chunk_loader(layout: DCPLayout, fqn: str, md: TensorStorageMetadata, start: tuple[int, ...],
                  sizes: tuple[int, ...]) -> Callable[[], NDArray[Any]]:
    return lambda: layout.chunk(fqn, md, start, sizes)


def _bytes_loader(layout: DCPLayout, fqn: str) -> Callable[[], NDArray[Any]]:
    return lambda: np.frombuffer(layout.raw(fqn, None), dtype=np.uint8).copy()


def open_layout(storage: Storage, name: str) -> ForeignCheckpoint:
    """The torch DCP checkpoint directory ``<name>/`` as the core handles it (metadata read and checked now)."""
    layout = DCPLayout(storage, name)
    return ForeignCheckpoint(IndexFormat.TORCH_DCP, layout.url, layout.objects, DCPLayoutReader(layout), layout)
