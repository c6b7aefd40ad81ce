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

A TensorFlow checkpoint exports the same way, its tensors named by object path
(``model/dense/kernel``); ``tf.string`` tensors go into .npz as fixed-width ``S`` arrays
(skipped if a string ends in NUL bytes, which ``S`` would drop) and are skipped by
.safetensors, like resource/variant tensors everywhere.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.cli import tf
from cloudckpt.cli.common import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_PERMISSION,
    EXIT_USAGE,
    CliError,
    Progress,
    human_size,
)
from cloudckpt.errors import ChecksumError
from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, ValueEntry
from cloudckpt.reader import ObjectSizes, ReadTarget, backed_buffer, read_arrays
from cloudckpt.storage import Storage, resolve
from cloudckpt.tfbundle import Bundle, Tensor, load_any_index
from cloudckpt.tools.inspect import array_nbytes

log = logging.getLogger("cloudckpt.cli")

#: Bytes of arrays fetched per batch (in parallel ranged reads) before they are written out.
BATCH_BYTES = 256 * 1024 * 1024

#: numpy dtype name -> safetensors dtype.
SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
    "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64",
    "int64": "I64", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def key_matches(path: str, key: str) -> bool:
    """Whether KEY selects the key path ``path`` (the rule ``cloudckpt export --help`` states).

    ``path`` equals ``key``, or continues it at a separator - ``/`` (a nested key) or ``.``
    (PyTorch's dotted ``state_dict`` names): ``model/head`` selects ``model/head.weight``
    and ``model/head/bias`` but not ``model/header``. A ``key`` ending in ``/`` or ``.`` is a
    plain prefix.
    """
    if not path.startswith(key):
        return False
    return len(path) == len(key) or key.endswith(("/", ".")) or path[len(key)] in "/."


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
    sizes = ObjectSizes(storage)

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
        batch.append(ReadTarget(path, entry, backed_buffer(index, path, entry, sizes), live=False))
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
                       layout: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> None:
    """``layout``: ``(key, dtype name, shape, bytes)`` of each array, in the order ``arrays`` yields them."""
    header: dict[str, Any] = {}
    offset = 0
    for path, dtype, shape, nbytes in layout:
        header[path] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
    for _path, array in arrays:
        out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def _plan(index: CheckpointIndex, url: str, keys: Sequence[str], safetensors: bool,
          ) -> tuple[list[tuple[str, ArrayEntry]], list[tuple[str, ValueEntry]], list[tuple[str, str]]]:
    """Arrays and values to write, and what is skipped: ``(path, "what it is|plural")``.

    Raises:
        CliError: a KEY selects no array or value (exit 3, naming every such KEY).
    """
    arrays: list[tuple[str, ArrayEntry]] = []
    values: list[tuple[str, ValueEntry]] = []
    skipped: list[tuple[str, str]] = []
    unmatched = dict.fromkeys(keys)
    for path, entry in index.entries.items():
        if isinstance(entry, NodeEntry):
            continue
        if keys:
            hits = [k for k in keys if key_matches(path, k)]
            if not hits:
                continue
            for key in hits:
                unmatched.pop(key, None)
        if isinstance(entry, ArrayEntry):
            if entry.pytype == "bytes":
                skipped.append((path, "opaque byte item (a DCP item serialized by torch.save)|opaque byte items "
                                      "(DCP items serialized by torch.save)"))
            elif safetensors and entry.dtype not in SAFETENSORS_DTYPES:
                skipped.append((path, f"{entry.dtype} array|{entry.dtype} arrays"))
            else:
                arrays.append((path, entry))
        elif safetensors:
            skipped.append((path, "inline value|inline values"))
        elif entry.type == "none":
            skipped.append((path, "None value|None values"))
        elif entry.type == "int" and not -2**63 <= entry.value < 2**63:
            skipped.append((path, "int beyond int64|ints beyond int64"))
        else:
            values.append((path, entry))
    if unmatched:
        raise CliError(f"{url}: no array or value matches {', '.join(map(repr, unmatched))}"
                       f"{_hint(index, next(iter(unmatched)))} (a KEY selects a key path equal to it or "
                       f"continuing it with '/' or '.'; see cloudckpt inspect for the keys)", EXIT_NOT_FOUND)
    return arrays, values, skipped


def _hint(index: CheckpointIndex, key: str) -> str:
    """`` - did you mean 'model/layers.0'?`` when a key path starts with ``key`` mid-name."""
    near = next((p for p, e in index.entries.items() if p.startswith(key) and not isinstance(e, NodeEntry)), None)
    return f" - did you mean {near!r}?" if near else ""


def skipped_summary(skipped: Sequence[tuple[str, str]], suffix: str) -> str:
    """One line for everything a format cannot hold (not one warning per inline scalar)."""
    groups: dict[str, list[str]] = {}
    for path, what in skipped:
        groups.setdefault(what, []).append(path)
    parts = []
    for what, paths in groups.items():
        one, many = what.split("|")
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        parts.append(f"{len(paths)} {one if len(paths) == 1 else many} ({shown})")
    return f"not exported, the {suffix} format cannot hold them: {'; '.join(parts)}"


def _temp_file(out_path: Path) -> tuple[int, str]:
    """A temporary file next to OUT; an error names OUT (and its directory), never the temporary name."""
    directory = out_path.parent if str(out_path.parent) else Path(".")
    try:
        return tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=directory)
    except FileNotFoundError:
        raise CliError(f"cannot write {out_path}: its directory {directory} does not exist", EXIT_NOT_FOUND) from None
    except NotADirectoryError:
        raise CliError(f"cannot write {out_path}: {directory} is not a directory", EXIT_NOT_FOUND) from None
    except PermissionError:
        raise CliError(f"cannot write {out_path}: permission denied in {directory}", EXIT_PERMISSION) from None
    except OSError as exc:
        raise CliError(f"cannot write {out_path}: {exc.strerror or exc}", EXIT_FAILED) from None


def run(args: Any) -> int:
    out_path = Path(args.out)
    suffix = out_path.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise CliError(f"{args.out}: the output must end in .npz or .safetensors", EXIT_USAGE)
    if out_path.exists() and not args.force:
        raise CliError(f"{args.out} exists (use --force to overwrite it)", EXIT_CONFLICT)
    fd, temp = _temp_file(out_path)  # first: an unwritable OUT fails before anything is fetched
    target = _Temp(fd)
    try:
        location = resolve(args.url)
        index = load_any_index(location.storage, location.name)
        if isinstance(index, Bundle):
            summary = _export_tf(index, args, suffix, target)
        else:
            summary = _export(location.storage, index, args, suffix, target)
        os.replace(temp, out_path)
    except BaseException as exc:
        target.close()
        Path(temp).unlink(missing_ok=True)
        if isinstance(exc, ChecksumError):
            raise ChecksumError(f"{exc} - the checkpoint is damaged: nothing was written to {out_path}; "
                                f"'cloudckpt verify {args.url}' lists every damaged key", exc.url, key=exc.key) from exc
        raise
    print(f"wrote {out_path}: {summary}")
    return 0


class _Temp:
    """The temporary file's descriptor until ``_write_into`` takes it over (then it closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def take(self) -> int:
        fd, self.fd = self.fd, None
        assert fd is not None, "the temporary file was already written"
        return fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.take())


def _export(storage: Storage, index: CheckpointIndex, args: Any, suffix: str, target: _Temp) -> str:
    name = index.name
    arrays, values, skipped = _plan(index, storage.url_for(name), args.keys, suffix == ".safetensors")
    if skipped:
        log.warning("%s", skipped_summary(skipped, suffix))
    if not arrays and not values:
        what = f"keys matching {', '.join(args.keys)}" if args.keys else "arrays or values"
        raise CliError(f"{storage.url_for(name)} has no {what} that {suffix} can hold", EXIT_NOT_FOUND)
    total = sum(array_nbytes(entry) for _, entry in arrays)

    def write(out: IO[bytes], progress: Progress) -> None:
        stream = _arrays(storage, index, arrays, progress)
        if suffix == ".npz":
            _write_npz(out, stream, values)
        else:
            layout = [(path, entry.dtype, entry.shape, array_nbytes(entry)) for path, entry in arrays]
            metadata = json.dumps(dict(index.metadata), default=str)
            _write_safetensors(out, stream, layout, {"cloudckpt_checkpoint": name, "cloudckpt_metadata": metadata})

    _write_into(target, total, f"export {name}", not args.quiet, write)
    return (f"{len(arrays)} arrays, {len(values)} values, {human_size(total)} of array data"
            f"{f'; skipped {len(skipped)}' if skipped else ''}")


def _export_tf(bundle: Bundle, args: Any, suffix: str, target: _Temp) -> str:
    """Export a TensorFlow checkpoint's tensors, named by object path (see cli/tf.py)."""
    tensors, skipped = tf.export_plan(bundle, args.keys, suffix == ".safetensors", frozenset(SAFETENSORS_DTYPES))
    if suffix == ".npz":
        strings = [t for t in tensors if t.dtype == "string"]
        tensors = [t for t in tensors if t.dtype != "string"]
    else:
        strings = []
    if not tensors and not strings:
        what = f"keys matching {', '.join(args.keys)}" if args.keys else "tensors"
        raise CliError(f"{bundle.url} has no {what} to export", EXIT_NOT_FOUND)
    texts: list[tuple[str, NDArray[Any]]] = []
    for name, value in bundle.read([t.name for t in strings]).items():
        fixed = tf.npz_strings(name, value)
        if fixed is None:
            skipped.append(f"{name} (strings ending in NUL bytes: numpy's S dtype would drop them)")
        else:
            texts.append((name, fixed))
    if skipped:
        log.warning("not exported, the %s format cannot hold them: %s", suffix, "; ".join(skipped))
    total = sum(t.nbytes for t in tensors)

    def write(out: IO[bytes], progress: Progress) -> None:
        stream = tf.export_arrays(bundle, tensors, BATCH_BYTES, progress)
        if suffix == ".npz":
            _write_npz(out, itertools.chain(stream, texts), [])
        else:
            layout = [(t.name, _dtype_name(t), t.shape, t.nbytes) for t in tensors]
            _write_safetensors(out, stream, layout, {"cloudckpt_checkpoint": bundle.name,
                                                     "cloudckpt_format": tf.FORMAT})

    _write_into(target, total, f"export {bundle.name}", not args.quiet, write)
    return (f"{len(tensors) + len(texts)} tensors, {human_size(total)} of numeric data"
            f"{f'; skipped {len(skipped)}' if skipped else ''}")


def _dtype_name(tensor: Tensor) -> str:
    assert tensor.numpy_dtype is not None
    return tensor.numpy_dtype.name


def _write_into(target: _Temp, total: int, description: str, show_progress: bool,
                write: Callable[[IO[bytes], Progress], None]) -> None:
    """Run ``write`` into the temporary file (made by ``_temp_file``) and fsync it."""
    with os.fdopen(target.take(), "wb") as out, Progress(total, description, enabled=show_progress) as progress:
        umask = os.umask(0o22)
        os.umask(umask)
        os.fchmod(out.fileno(), 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
        write(out, progress)
        out.flush()
        os.fsync(out.fileno())
