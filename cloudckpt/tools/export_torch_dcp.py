"""``export --format torch-dcp``: a cloudckpt checkpoint written as torch DCP's own ``FileSystemWriter`` directory.

For tools that only read torch's layout (``FileSystemReader``, ``dcp_to_torch_save``,
``torch.distributed.checkpoint.format_utils``). The directory is written by torch itself -
``dcp.save(state_dict, storage_writer=FileSystemWriter(tmp), no_dist=True)`` - from values
read out of the cloudckpt checkpoint (each CRC32C-checked), so it is exactly what DCP writes:

- a checkpoint written through ``cloudckpt.dcp`` (its index has a ``dcp`` field) keeps DCP's
  keys: each tensor under its FQN, each byte item as the value DCP serialized (loaded with
  ``torch.load(weights_only=True)``), nested again by the ``planner_data`` DCP recorded, so
  ``dcp_to_torch_save`` gives back the state dict's own structure;
- any other cloudckpt checkpoint is exported as the nested dict of its key paths (a key path
  ``model/layers/0/kernel`` becomes the DCP key ``model.layers.0.kernel``); inline values are
  items; arrays become CPU tensors (numpy dtypes, bfloat16 and float8 through their torch twins).

The directory is written next to OUT under a temporary name and renamed into place at the end.
Memory: torch's writer takes the whole state dict, so the checkpoint's arrays are in memory at
once (a sharded array is assembled whole, as ``load_variable`` assembles it).
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cloudckpt.errors import CheckpointFormatError, InvalidURLError
from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, ValueEntry, decode_segment
from cloudckpt.format.sniff import load_any_index
from cloudckpt.restoring.checkpoint_reader import CheckpointReader
from cloudckpt.storage import CheckpointPath, resolve
from cloudckpt.tools.export import ExportReport, NothingToExportError, key_matches


def _nested(flat: Mapping[str, Any], paths: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """DCP's flat ``{fqn: value}`` nested again along ``planner_data``'s paths (an int step is a list index)."""
    root: dict[Any, Any] = {}
    for fqn, value in flat.items():
        path = list(paths.get(fqn, (fqn,)))
        node: Any = root
        for step, after in itertools.pairwise(path):
            empty: Any = [] if isinstance(after, int) else {}
            if isinstance(node, list):
                while len(node) <= step:
                    node.append(None)
                if node[step] is None:
                    node[step] = empty
                node = node[step]
            else:
                node = node.setdefault(step, empty)
        if isinstance(node, list):
            while len(node) <= path[-1]:
                node.append(None)
        node[path[-1]] = value
    return root


def _key_nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Key paths (``model/layers/0/kernel``) as nested dicts of their decoded segments (as strings)."""
    root: dict[str, Any] = {}
    for path, value in flat.items():
        parts = [str(decode_segment(s)) for s in path.split("/")]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return root


def _state_dict(reader: CheckpointReader, index: CheckpointIndex, keys: Sequence[str]) -> tuple[dict[str, Any], int]:
    """The state dict to hand ``dcp.save`` and its array bytes."""
    import torch

    from cloudckpt.adapters import torch as torch_adapter

    flat: dict[str, Any] = {}
    total = 0
    unmatched = dict.fromkeys(keys)
    is_dcp = index.dcp is not None
    for path, entry in index.entries.items():
        if isinstance(entry, NodeEntry):
            continue
        name = str(decode_segment(path)) if is_dcp else path
        hits = [k for k in keys if key_matches(name, k)]
        if keys and not hits:
            continue
        for key in hits:
            unmatched.pop(key, None)
        if isinstance(entry, ValueEntry):
            flat[name] = entry.value
            continue
        assert isinstance(entry, ArrayEntry)
        value = reader.get_tensor(path)
        if entry.pytype == "bytes":
            raw = bytes(value) if isinstance(value, bytes | bytearray) else np.asarray(value).tobytes()
            flat[name] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            continue
        tensor = value if isinstance(value, torch.Tensor) else torch_adapter.numpy_to_tensor(
            np.asarray(value, order="C"))
        flat[name] = tensor.detach().cpu().contiguous()
        total += flat[name].numel() * flat[name].element_size()
    if unmatched:
        raise NothingToExportError(f"{index.name}: no key matches {', '.join(map(repr, unmatched))} "
                                   f"(see cloudckpt inspect for the keys)", index.name)
    if not flat:
        raise NothingToExportError(f"{index.name} holds nothing to export", index.name)
    if not is_dcp:
        return _key_nested(flat), total
    planner = index.dcp.get("planner_data") if index.dcp else None
    paths = {} if not isinstance(planner, dict) else {k: v for k, v in planner.items()
                                                         if isinstance(v, list | tuple) and v}
    return _nested(flat, paths), total


def export_torch_dcp(path: CheckpointPath, out: str | os.PathLike[str], keys: Sequence[str] = (), *,
                     force: bool = False) -> ExportReport:
    """Write the cloudckpt checkpoint at ``path`` as torch DCP's ``FileSystemWriter`` directory ``out``.

    Raises:
        FileExistsError: ``out`` exists and not ``force``.
        CheckpointFormatError: the checkpoint is not cloudckpt's (a foreign one is already another format).
        NothingToExportError: a KEY selects nothing.
        ChecksumError: the checkpoint is damaged (nothing is left under ``out``).
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    out_path = Path(out)
    if out_path.suffix.lower() in (".npz", ".safetensors"):
        raise InvalidURLError(f"{out}: --format torch-dcp writes a directory, not a {out_path.suffix} file", str(out))
    if out_path.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to replace it)")
    location = resolve(path)
    index = load_any_index(location.storage, location.name)
    if not isinstance(index, CheckpointIndex):
        raise CheckpointFormatError(f"{index.url} is a {index.format.value}: export --format torch-dcp reads "
                                    f"cloudckpt checkpoints (cloudckpt cp converts this one first)", index.url)
    state, total = _state_dict(CheckpointReader(location), index, keys)
    parent = out_path.parent if str(out_path.parent) else Path(".")
    temp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=parent))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            save(state, storage_writer=FileSystemWriter(str(temp)), no_dist=True)
        if out_path.exists():
            shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
        os.replace(temp, out_path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    arrays = sum(1 for e in index.entries.values() if isinstance(e, ArrayEntry) and e.pytype != "bytes")
    return ExportReport(out_path, "torch-dcp", arrays, len(index.entries) - arrays - sum(
        1 for e in index.entries.values() if isinstance(e, NodeEntry)), total, ())
