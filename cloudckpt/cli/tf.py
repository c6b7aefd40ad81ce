"""What the commands do with a TensorFlow checkpoint (TensorBundle), read by ``cloudckpt.tfbundle``.

Each command tells the formats apart by the ``.index`` bytes (``tfbundle.load_any_index``)
and hands a TensorFlow checkpoint to the function here: ``inspect`` prints its tensors by
object path and raw key (``cloudckpt.tools.inspect`` reads them), ``export`` writes its
tensors to .npz/.safetensors. (``cp`` copies it as-is, in ``copy.py``; ``verify`` checks it
in ``cloudckpt.tools.verify``, next to the streaming it shares; ``ls`` sizes it there too.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.cli.common import EXIT_NOT_FOUND, CliError, Progress, human_size, print_json, print_table
from cloudckpt.tfbundle import Bundle, Tensor
from cloudckpt.tools.inspect import TF_FORMAT, BundleInfo

FORMAT = TF_FORMAT


# ---------------------------------------------------------------------------- inspect
def inspect(info: BundleInfo, args: Any) -> int:
    bundle, tensors, values = info.bundle, info.tensors, info.values
    if args.json:
        print_json(info.to_json())
        return 0
    print(f"checkpoint  {bundle.url}")
    print(f"format      {info.description}")
    print(f"data        {len(tensors)} tensors, {human_size(sum(t.nbytes for t in tensors))}")
    print()
    if not tensors:
        raise CliError(f"{bundle.url} holds no tensors", EXIT_NOT_FOUND)
    table = [["KEY", "DTYPE", "SHAPE", "SIZE", "VALUE / LAYOUT", "TENSORFLOW KEY"]]
    for t in tensors:
        layout = json.dumps(values[t.name]) if t.name in values else ""
        if t.slices:
            layout = f"partitioned: {t.slices} slices"
        table.append([t.name, t.dtype, "[" + ", ".join(map(str, t.shape)) + "]", human_size(t.nbytes),
                      layout[:50], t.key if t.key != t.name else ""])
    print_table(table)
    return 0


def _entry_json(bundle: Bundle, tensor: Tensor, values: dict[str, Any]) -> dict[str, Any]:
    entry = bundle.entries[tensor.key]
    doc: dict[str, Any] = {"key": tensor.name, "tensorflow_key": tensor.key, "kind": "array", "dtype": tensor.dtype,
                           "shape": list(tensor.shape), "size": tensor.nbytes}
    if tensor.name in values:
        doc["value"] = values[tensor.name]
    if not entry.slices:
        doc["shard"], doc["offset"], doc["crc32c"] = entry.shard, entry.offset, entry.crc32c
    else:
        doc["slices"] = len(entry.slices)
    return doc


# ---------------------------------------------------------------------------- export
def export_plan(bundle: Bundle, keys: Sequence[str], safetensors: bool,
                safetensors_dtypes: frozenset[str]) -> tuple[list[Tensor], list[str]]:
    """The tensors to export, and what is skipped (with why)."""
    chosen: list[Tensor] = []
    skipped: list[str] = []
    for tensor in bundle.tensors():
        if keys and not any(tensor.name == k or tensor.name.startswith(k.rstrip("/") + "/") or tensor.key == k
                            for k in keys):
            continue
        if tensor.numpy_dtype is None:
            skipped.append(f"{tensor.name} ({tensor.dtype}: not readable)")
        elif safetensors and (tensor.dtype == "string" or tensor.numpy_dtype.name not in safetensors_dtypes):
            skipped.append(f"{tensor.name} ({tensor.dtype})")
        else:
            chosen.append(tensor)
    return chosen, skipped


def export_arrays(bundle: Bundle, tensors: Sequence[Tensor], batch_bytes: int,
                  progress: Progress) -> Iterator[tuple[str, NDArray[Any]]]:
    """The tensors in order, fetched in batches of at most ``batch_bytes``, each CRC32C-checked."""
    batch: list[str] = []
    size = 0
    for tensor in tensors:
        if batch and size + tensor.nbytes > batch_bytes:
            yield from _flush(bundle, batch, progress)
            batch, size = [], 0
        batch.append(tensor.name)
        size += tensor.nbytes
    if batch:
        yield from _flush(bundle, batch, progress)


def _flush(bundle: Bundle, names: list[str], progress: Progress) -> Iterator[tuple[str, NDArray[Any]]]:
    values = bundle.read(names)
    for name in names:
        progress.update(values[name].nbytes)
        yield name, values[name]


def npz_strings(name: str, array: NDArray[Any]) -> NDArray[Any] | None:
    """A string tensor as a fixed-width ``S`` array (no pickle), or ``None`` if that would lose bytes.

    numpy's ``S`` strips trailing NUL bytes when read back, so a tensor with such strings
    cannot be stored exactly and is skipped (with a warning) instead.
    """
    flat = array.reshape(-1)
    if any(value.endswith(b"\0") for value in flat):
        return None
    width = max((len(value) for value in flat), default=1) or 1
    return np.array(flat.tolist(), dtype=f"S{width}").reshape(array.shape) if flat.size else \
        np.empty(array.shape, dtype="S1")
