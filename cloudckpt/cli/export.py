"""``cloudckpt export URL/ckpt-N OUT.npz``: a checkpoint's arrays in a format any tool reads.

Arrays are named by their key paths (``model/layers/0/kernel``). They are fetched in
batches of at most ``BATCH_BYTES`` (an array larger than that alone: it must be whole in
memory to be written), CRC32C-checked like any restore, and written one by one into a
temporary file next to OUT that is renamed into place at the end - an interrupted export
leaves no half file under OUT's name.

``.npz``: numpy cannot name ml_dtypes types (bfloat16, float8, int4 ...; ``np.save``
would write them as opaque ``V2``), so they are widened losslessly: floats to float32,
int2/int4 to int8, uint2/uint4 to uint8. Inline scalar values become 0-d arrays.
``.safetensors`` is written directly (its format is a JSON header and raw bytes, no
dependency needed); it keeps bfloat16 and float8 and skips what it cannot hold.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.cli.common import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_USAGE, CliError, Progress, human_size
from cloudckpt.cli.inspect import array_nbytes
from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, ValueEntry
from cloudckpt.index_store import load_index
from cloudckpt.reader import ReadTarget, new_buffer, read_arrays
from cloudckpt.storage import Storage, resolve

log = logging.getLogger("cloudckpt.cli")

#: Bytes of arrays fetched per batch (in parallel ranged reads) before they are written out.
BATCH_BYTES = 256 * 1024 * 1024

#: numpy dtype name -> safetensors dtype.
SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
    "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64",
    "int64": "I64", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def _selected(path: str, keys: Sequence[str]) -> bool:
    return not keys or any(path == k or path.startswith(k.rstrip("/") + "/") for k in keys)


def _npz_dtype(array: NDArray[Any]) -> NDArray[Any]:
    """Widen ml_dtypes arrays to a dtype numpy (and every npz reader) knows; exact for all of them."""
    if array.dtype.kind != "V":
        return array
    name = array.dtype.name
    if name.startswith("uint"):
        return array.astype(np.uint8)
    if name.startswith("int"):
        return array.astype(np.int8)
    return array.astype(np.float32)


def _arrays(storage: Storage, index: CheckpointIndex, entries: Sequence[tuple[str, ArrayEntry]],
            progress: Progress) -> Iterator[tuple[str, NDArray[Any]]]:
    """The arrays in order, fetched in bounded batches, each verified against its CRC32C."""
    batch: list[ReadTarget] = []
    size = 0

    def flush() -> Iterator[tuple[str, NDArray[Any]]]:
        read_arrays(storage, index, batch)
        for target in batch:
            progress.update(target.dest.nbytes)
            yield target.path, target.dest

    for path, entry in entries:
        nbytes = array_nbytes(entry)
        if batch and size + nbytes > BATCH_BYTES:
            yield from flush()
            batch, size = [], 0
        batch.append(ReadTarget(path, entry, new_buffer(entry), live=False))
        size += nbytes
    if batch:
        yield from flush()


def _write_npz(out: IO[bytes], arrays: Iterator[tuple[str, NDArray[Any]]],
               values: Sequence[tuple[str, ValueEntry]]) -> None:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path, array in arrays:
            with archive.open(path + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, _npz_dtype(array), allow_pickle=False)
        for path, entry in values:
            with archive.open(path + ".npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(entry.value), allow_pickle=False)


def _write_safetensors(out: IO[bytes], arrays: Iterator[tuple[str, NDArray[Any]]],
                       entries: Sequence[tuple[str, ArrayEntry]], index: CheckpointIndex) -> None:
    header: dict[str, Any] = {}
    offset = 0
    for path, entry in entries:
        nbytes = array_nbytes(entry)
        header[path] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"cloudckpt_checkpoint": index.name,
                              "cloudckpt_metadata": json.dumps(dict(index.metadata), default=str)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
    for _path, array in arrays:
        out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def _plan(index: CheckpointIndex, keys: Sequence[str], safetensors: bool,
          ) -> tuple[list[tuple[str, ArrayEntry]], list[tuple[str, ValueEntry]], list[str]]:
    """Arrays and values to write, and what is skipped (with why)."""
    arrays: list[tuple[str, ArrayEntry]] = []
    values: list[tuple[str, ValueEntry]] = []
    skipped: list[str] = []
    for path, entry in index.entries.items():
        if isinstance(entry, NodeEntry) or not _selected(path, keys):
            continue
        if isinstance(entry, ArrayEntry):
            if entry.pytype == "bytes":
                skipped.append(f"{path} (opaque bytes, e.g. a DCP item serialized by torch.save)")
            elif safetensors and entry.dtype not in SAFETENSORS_DTYPES:
                skipped.append(f"{path} ({entry.dtype})")
            elif len(entry.chunks) > 0:
                arrays.append((path, entry))
        elif safetensors or entry.type == "none" or (entry.type == "int" and not -2**63 <= entry.value < 2**63):
            skipped.append(f"{path} (inline {entry.type})")
        else:
            values.append((path, entry))
    return arrays, values, skipped


def run(args: Any) -> int:
    out_path = Path(args.out)
    suffix = out_path.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise CliError(f"{args.out}: the output must end in .npz or .safetensors", EXIT_USAGE)
    if out_path.exists() and not args.force:
        raise CliError(f"{args.out} exists (use --force to overwrite it)", EXIT_CONFLICT)
    location = resolve(args.url)
    storage, name = location.storage, location.name
    index = load_index(storage, name)
    arrays, values, skipped = _plan(index, args.keys, suffix == ".safetensors")
    if not arrays and not values:
        what = f"keys matching {', '.join(args.keys)}" if args.keys else "arrays or values"
        raise CliError(f"{storage.url_for(name)} has no {what} to export", EXIT_NOT_FOUND)
    for item in skipped:
        log.warning("not exported (the %s format cannot hold it): %s", suffix, item)
    total = sum(array_nbytes(entry) for _, entry in arrays)
    directory = out_path.parent if str(out_path.parent) else Path(".")
    fd, temp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
        with os.fdopen(fd, "wb") as out, Progress(total, f"export {name}", enabled=not args.quiet) as progress:
            stream = _arrays(storage, index, arrays, progress)
            if suffix == ".npz":
                _write_npz(out, stream, values)
            else:
                _write_safetensors(out, stream, arrays, index)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, out_path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    print(f"wrote {out_path}: {len(arrays)} arrays, {len(values)} values, {human_size(total)} of array data"
          f"{f'; skipped {len(skipped)}' if skipped else ''}")
    return 0
