"""DCP's ``Metadata`` <-> a cloudckpt index: entries for what DCP stores, the ``dcp`` field for the rest.

A checkpoint written through ``cloudckpt.dcp`` is an ordinary cloudckpt checkpoint:

- every DCP key (an FQN such as ``model.layers.0.weight``) is one entry directly under the
  root, its key path the FQN as one segment (``encode_segment``: ``/`` becomes ``~1``);
- a tensor is an array entry (``pytype`` ``tensor``, the global shape, one chunk per DCP
  chunk with its offsets into the global tensor); a non-tensor item, which DCP serializes
  itself, is a ``bytes`` entry (1-D uint8) that cloudckpt never interprets;
- the index's top-level ``dcp`` field holds what else DCP's ``Metadata`` carries, as plain
  JSON: per tensor its ``TensorProperties`` (torch dtype name, ``requires_grad``, and the
  deprecated layout / memory format / pinning when they are not the defaults),
  ``planner_data`` (``plain`` codec), ``storage_meta``, DCP's metadata ``version``, and
  ``save_counter`` when a ``DCPCheckpoint`` wrote it.

Decoding treats the index as untrusted input: every field is type-checked, dtypes are
looked up by name among torch's dtypes (never evaluated), the torch dtype must match the
entry's stored dtype, and any violation is a ``CheckpointFormatError`` naming the key.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from cloudckpt.adapters import torch as torch_adapter
from cloudckpt.dcp.plain import decode_plain, encode_plain
from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, decode_segment, dtype_name, encode_segment

_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}
_DTYPE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_STORAGE_META_FIELDS = frozenset({"checkpoint_id", "save_id", "load_id", "modules"})
_DCP_FIELDS = frozenset({"version", "tensors", "planner_data", "storage_meta", "save_counter"})
_PROPERTY_FIELDS = frozenset({"dtype", "requires_grad", "layout", "memory_format", "pin_memory"})


# ---------------------------------------------------------------------------- names and dtypes
def fqn_path(fqn: str) -> str:
    """The key path of DCP key ``fqn``: one segment under the root."""
    return encode_segment(fqn)


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the attribute of ``torch`` that names it)."""
    return str(dtype).removeprefix("torch.")


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy (or ml_dtypes) dtype a torch dtype is stored as.

    Raises:
        ValueError: a torch dtype cloudckpt cannot store (quantized, complex32, ...).
    """
    try:
        return torch_adapter.tensor_meta(torch.empty(0, dtype=dtype))[1]
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"torch dtype {dtype} cannot be checkpointed: {exc}") from None


@functools.lru_cache(maxsize=64)
def stored_dtype_name(dtype: torch.dtype) -> str:
    """The index's dtype name for tensors of ``dtype``."""
    return dtype_name(numpy_dtype(dtype))


# ---------------------------------------------------------------------------- encode
def _properties_json(props: TensorProperties) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": torch_dtype_name(props.dtype), "requires_grad": bool(props.requires_grad)}
    if props.layout != torch.strided:
        raise ValueError(f"tensors with layout {props.layout} cannot be checkpointed")
    if props.memory_format != torch.contiguous_format:
        names = {v: k for k, v in _MEMORY_FORMATS.items()}
        out["memory_format"] = names[props.memory_format]
    if props.pin_memory:
        out["pin_memory"] = True
    return out


def encode_dcp_field(metadata: Metadata, storage_meta: StorageMeta | None, save_counter: int | None) -> dict[str, Any]:
    """The index's ``dcp`` field for ``metadata`` (plain JSON, never pickle).

    Raises:
        TypeError: ``planner_data`` holds values plain JSON cannot carry (see ``plain``).
        ValueError: a tensor property cloudckpt cannot store.
    """
    tensors = {fqn: _properties_json(md.properties) for fqn, md in metadata.state_dict_metadata.items()
               if isinstance(md, TensorStorageMetadata)}
    doc: dict[str, Any] = {"version": metadata.version, "tensors": tensors}
    if metadata.planner_data is not None:
        doc["planner_data"] = encode_plain(metadata.planner_data, "DCP Metadata.planner_data")
    meta = metadata.storage_meta or storage_meta
    if meta is not None:
        doc["storage_meta"] = {
            "checkpoint_id": None if meta.checkpoint_id is None else str(meta.checkpoint_id),
            "save_id": meta.save_id, "load_id": meta.load_id, "modules": list(meta.modules)}
    if save_counter is not None:
        doc["save_counter"] = int(save_counter)
    return doc


# ---------------------------------------------------------------------------- decode
class _Check:
    def __init__(self, url: str) -> None:
        self.url = url

    def fail(self, where: str, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"DCP metadata of {self.url}: {where}: {problem}")

    def fields(self, doc: object, where: str, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise self.fail(where, f"expected an object, got {type(doc).__name__}")
        extra = doc.keys() - allowed
        if extra:
            raise self.fail(where, f"unknown field(s) {sorted(extra)}")
        return doc

    def optional_str(self, value: object, where: str) -> str | None:
        if value is not None and not isinstance(value, str):
            raise self.fail(where, f"expected a string or null, got {type(value).__name__}")
        return value


def _torch_dtype(check: _Check, name: object, where: str) -> torch.dtype:
    if not isinstance(name, str) or not _DTYPE_NAME.fullmatch(name):
        raise check.fail(where, f"bad torch dtype name {name!r}")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise check.fail(where, f"{name!r} is not a torch dtype")
    return dtype


def _properties(check: _Check, raw: object, where: str, entry: ArrayEntry) -> TensorProperties:
    doc = check.fields(raw, where, _PROPERTY_FIELDS)
    if "dtype" not in doc:
        raise check.fail(where, "missing field 'dtype'")
    dtype = _torch_dtype(check, doc["dtype"], where + ".dtype")
    try:
        stored = stored_dtype_name(dtype)
    except ValueError as exc:
        raise check.fail(where, str(exc)) from None
    if stored != entry.dtype:
        raise check.fail(where, f"torch dtype {doc['dtype']} is stored as {stored}, but the entry holds {entry.dtype}")
    flags = {}
    for flag in ("requires_grad", "pin_memory"):
        value = doc.get(flag, False)
        if not isinstance(value, bool):
            raise check.fail(f"{where}.{flag}", f"expected a boolean, got {type(value).__name__}")
        flags[flag] = value
    layout = doc.get("layout", "strided")
    memory_format = doc.get("memory_format", "contiguous_format")
    if layout not in _LAYOUTS:
        raise check.fail(where + ".layout", f"unknown layout {layout!r}")
    if memory_format not in _MEMORY_FORMATS:
        raise check.fail(where + ".memory_format", f"unknown memory format {memory_format!r}")
    return TensorProperties(dtype=dtype, layout=_LAYOUTS[layout], requires_grad=flags["requires_grad"],
                            memory_format=_MEMORY_FORMATS[memory_format], pin_memory=flags["pin_memory"])


def _storage_meta(check: _Check, raw: object) -> StorageMeta:
    doc = check.fields(raw, "storage_meta", _STORAGE_META_FIELDS)
    modules = doc.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise check.fail("storage_meta.modules", "expected a list of strings")
    return StorageMeta(checkpoint_id=check.optional_str(doc.get("checkpoint_id"), "storage_meta.checkpoint_id"),
                       save_id=check.optional_str(doc.get("save_id"), "storage_meta.save_id"),
                       load_id=check.optional_str(doc.get("load_id"), "storage_meta.load_id"), modules=modules)


def dcp_field(index: CheckpointIndex, url: str) -> Mapping[str, Any]:
    """The index's ``dcp`` field, checked to be there and to have only known fields.

    Raises:
        CheckpointFormatError: the index has no ``dcp`` field (it was not written through
            DCP: read it with ``cloudckpt.CheckpointReader`` instead) or an unknown field.
    """
    check = _Check(url)
    if index.dcp is None:
        raise CheckpointFormatError(
            f"{url} was not written through torch.distributed.checkpoint (its index has no 'dcp' field); "
            f"read it with cloudckpt.Checkpoint / CheckpointReader instead")
    return check.fields(index.dcp, "dcp", _DCP_FIELDS)


def saved_counter(index: CheckpointIndex, url: str) -> int | None:
    """The ``save_counter`` a ``DCPCheckpoint`` recorded, or ``None``."""
    value = dcp_field(index, url).get("save_counter")
    if value is not None and (type(value) is not int or value < 0):
        raise _Check(url).fail("save_counter", f"expected a non-negative integer, got {value!r}")
    return value


def decode_metadata(index: CheckpointIndex, url: str) -> Metadata:
    """DCP's ``Metadata`` of a checkpoint written through ``cloudckpt.dcp`` (validated).

    ``storage_data`` is left ``None``: the reader keeps the index itself, which says
    where every chunk's bytes are.

    Raises:
        CheckpointFormatError: not a DCP checkpoint (no ``dcp`` field, nested entries,
            inline values), or a malformed ``dcp`` field.
    """
    check = _Check(url)
    doc = dcp_field(index, url)
    tensors = doc.get("tensors", {})
    if not isinstance(tensors, dict):
        raise check.fail("tensors", f"expected an object, got {type(tensors).__name__}")
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for path, entry in index.entries.items():
        if path == "":
            continue
        where = f"entries[{path!r}]"
        if "/" in path:
            raise check.fail(where, "a DCP checkpoint has its keys directly under the root")
        if not isinstance(entry, ArrayEntry):
            kind = "node" if isinstance(entry, NodeEntry) else "inline value"
            raise check.fail(where, f"a DCP checkpoint holds only tensors and byte items, not a {kind}")
        fqn = decode_segment(path)
        if not isinstance(fqn, str):
            raise check.fail(where, "a DCP key must be a string")
        if entry.pytype == "bytes":
            if fqn in tensors:
                raise check.fail(f"tensors[{fqn!r}]", "describes a bytes entry")
            state[fqn] = BytesStorageMetadata()
            continue
        if fqn not in tensors:
            raise check.fail("tensors", f"no properties for tensor {fqn!r}")
        props = _properties(check, tensors[fqn], f"tensors[{fqn!r}]", entry)
        chunks = [ChunkStorageMetadata(offsets=torch.Size(c.start), sizes=torch.Size(c.shape)) for c in entry.chunks]
        state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(entry.shape), chunks=chunks)
    unknown = tensors.keys() - state.keys()
    if unknown:
        raise check.fail("tensors", f"describes keys the checkpoint does not hold: {sorted(unknown)[:5]}")
    version = check.optional_str(doc.get("version"), "version")
    planner_data = decode_plain(doc["planner_data"], f"DCP metadata of {url}: planner_data") \
        if "planner_data" in doc else None
    storage_meta = _storage_meta(check, doc["storage_meta"]) if "storage_meta" in doc else StorageMeta()
    saved_counter(index, url)
    return Metadata(state_dict_metadata=dict(state), planner_data=planner_data, storage_data=None,
                    storage_meta=storage_meta, version=version)
