"""Reading torch DCP's own ``.metadata`` (a pickle) with an allowlist, as ``torch.load(weights_only=True)`` does.

torch's ``FileSystemReader.read_metadata`` (and the fsspec one) calls plain ``pickle.load``
on ``<checkpoint>/.metadata``: any global the file names is imported and called. cloudckpt
reads it only when the user points at such a checkpoint (``load_variable``, ``ls``,
``inspect``, ``verify``, ``cp``, ``export``), never while reading its own checkpoints, and
only like this:

- the object is HEADed first and refused above ``MAX_METADATA_BYTES`` before a byte is read;
- it is unpickled by ``pickle.Unpickler`` whose ``find_class`` resolves only the globals DCP's
  metadata is made of (its dataclasses in ``torch.distributed.checkpoint.metadata``, the file
  system's ``_StorageInfo``, ``torch.Size``, torch's dtypes, layouts and memory formats,
  ``pathlib`` paths) plus what the user allowed ``torch.load(weights_only=True)`` to load with
  ``torch.serialization.add_safe_globals`` - the weights_only rule. torch's own weights_only
  unpickler is not used because it does not read pickle protocol 4, which ``.metadata`` is in
  (``Unsupported operand 149``, its FRAME opcode);
- what comes out must be a DCP ``Metadata`` whose ``storage_data`` maps every item to a file
  name inside the checkpoint directory (no ``/``, no ``..``) and a non-negative byte range.

Any other global is refused with a ``CheckpointFormatError`` naming it and the object.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format.index_fetch import MAX_INDEX_BYTES
from cloudckpt.storage import Storage

#: The largest ``.metadata`` read (the same cap as a cloudckpt index's).
MAX_METADATA_BYTES = MAX_INDEX_BYTES
#: The marker of the layout: DCP writes it last, after every rank's ``.distcp`` files.
METADATA_FILE = ".metadata"

_METADATA_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")
_FILE_NAME = re.compile(r"[^/\\\x00]{1,255}")


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        (dcp_metadata.__name__, name): getattr(dcp_metadata, name) for name in _METADATA_CLASSES}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
            allowed[("torch", name)] = value
    for extra in torch.serialization.get_safe_globals():  # the user's add_safe_globals, as weights_only honours
        obj, name = extra if isinstance(extra, tuple) else (extra, f"{extra.__module__}.{extra.__qualname__}")
        module, _, attr = name.rpartition(".")
        allowed[(module, attr)] = obj
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only allowlisted globals (see the module docs)."""

    def __init__(self, data: bytes, url: str) -> None:
        super().__init__(io.BytesIO(data))
        self._url = url
        self._allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise CheckpointFormatError(
                f"{self._url} names {module}.{name}, which torch DCP's metadata does not use; refusing to load it "
                f"(allow it with torch.serialization.add_safe_globals if you trust this checkpoint)", self._url)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointFormatError(f"{self._url} holds a persistent reference, which DCP's metadata does not",
                                    self._url)


def _check(metadata: object, url: str) -> Metadata:
    if not isinstance(metadata, Metadata):
        raise CheckpointFormatError(f"{url} holds a {type(metadata).__name__}, not torch DCP's Metadata", url)
    if not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointFormatError(f"{url}: state_dict_metadata is not a dict", url)
    storage_data = metadata.storage_data
    if not isinstance(storage_data, dict):
        raise CheckpointFormatError(f"{url} has no storage_data: not written by FileSystemWriter or FsspecWriter",
                                    url)
    for key, info in storage_data.items():
        where = f"{url}: storage_data[{getattr(key, 'fqn', key)!r}]"
        if not isinstance(info, _StorageInfo):
            raise CheckpointFormatError(f"{where} is a {type(info).__name__}, not a file byte range", url)
        path = info.relative_path
        if not isinstance(path, str) or not _FILE_NAME.fullmatch(path) or path in (".", ".."):
            raise CheckpointFormatError(f"{where} names {path!r}, not a file of the checkpoint directory", url)
        if type(info.offset) is not int or type(info.length) is not int or info.offset < 0 or info.length < 0:
            raise CheckpointFormatError(f"{where} has the byte range {info.offset!r}+{info.length!r}", url)
    return metadata


def read_dcp_metadata(storage: Storage, name: str) -> Metadata:
    """The DCP ``Metadata`` of the checkpoint directory ``<name>/`` (size-capped, allowlisted, checked).

    Raises:
        CheckpointNotFoundError: no ``.metadata`` there.
        CheckpointFormatError: too large, not a pickle, a global outside the allowlist, or not DCP's metadata.
    """
    key = f"{name}/{METADATA_FILE}"
    url = storage.url_for(key)
    size = storage.head(key).size
    if size > MAX_METADATA_BYTES:
        raise CheckpointFormatError(f"{url} is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit for torch "
                                    f"DCP metadata", url)
    data = storage.get(key)
    try:
        loaded = _MetadataUnpickler(data, url).load()
    except CheckpointFormatError:
        raise
    except Exception as exc:  # any malformed pickle: EOFError, UnpicklingError, TypeError from a bad reduce ...
        raise CheckpointFormatError(f"{url} is not readable torch DCP metadata: {type(exc).__name__}: {exc}",
                                    url) from exc
    return _check(loaded, url)
