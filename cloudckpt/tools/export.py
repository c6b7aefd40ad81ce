"""``export``: a checkpoint's arrays written as a plain .npz or .safetensors file (``cloudckpt export``).

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
.safetensors, like resource/variant tensors everywhere. Any other foreign format a registered
reader opens (torch DCP's layout, ...) exports its tensors by name through that reader, one
tensor in memory at a time.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import ChecksumError, InvalidURLError, NotFoundError, PermissionDeniedError, StorageError
from cloudckpt.format import ArrayEntry, CheckpointIndex, NodeEntry, ValueEntry
from cloudckpt.format.sniff import ForeignCheckpoint
from cloudckpt.restoring.array_reads import read_arrays
from cloudckpt.restoring.buffers import ObjectSizes, ReadTarget, backed_buffer
from cloudckpt.storage import CheckpointPath, Location, Storage, resolve
from cloudckpt.tfbundle import Bundle, Tensor
from cloudckpt.tools.export_formats import SAFETENSORS_DTYPES, npz_strings, write_npz, write_safetensors
from cloudckpt.tools.foreign import ForeignTensor, foreign_tensors, format_name, open_checkpoint
from cloudckpt.tools.inspect import TF_FORMAT, array_nbytes
from cloudckpt.tools.progress import ProgressFactory, ProgressSink, reporting, silent

log = logging.getLogger("cloudckpt.tools")

#: Bytes of arrays fetched per batch (in parallel ranged reads) before they are written out.
BATCH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What :func:`export` wrote.

    Attributes:
        path: the file written.
        format: the checkpoint's format (``cloudckpt`` or ``tensorflow``).
        arrays: arrays (tensors, for a TensorFlow checkpoint) written.
        values: inline values written as 0-d arrays (.npz only; none for TensorFlow).
        bytes: bytes of array data written.
        skipped: key paths (TensorFlow: names with why) the file format cannot hold.
    """

    path: Path
    format: str
    arrays: int
    values: int
    bytes: int
    skipped: tuple[str, ...]


class NothingToExportError(NotFoundError):
    """The keys asked for select nothing, or nothing selected is something the file format can hold."""


def export(path: CheckpointPath, out: str | os.PathLike[str], keys: Sequence[str] = (), *, force: bool = False,
           progress: ProgressFactory = silent) -> ExportReport:
    """Write the checkpoint at ``path``'s arrays (those ``keys`` select; all by default) to ``out``.

    ``out`` ends in ``.npz`` or ``.safetensors``; it is written as a temporary file next to
    it, renamed into place at the end: an interrupted or failed export leaves nothing under
    its name. A KEY selects every key path equal to it or continuing it with ``/`` or ``.``.

    Raises:
        InvalidURLError: ``out`` does not end in .npz or .safetensors.
        FileExistsError: ``out`` exists and not ``force``.
        NothingToExportError: a KEY selects nothing (naming it), or nothing selected fits the format.
        ChecksumError: the checkpoint is damaged (nothing is written).
    """
    out_path = Path(out)
    suffix = out_path.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise InvalidURLError(f"{out}: the output must end in .npz or .safetensors", str(out))
    if out_path.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to overwrite it)")
    fd, temp = _temp_file(out_path)  # first: an unwritable OUT fails before anything is fetched
    target = _Temp(fd)
    try:
        location = resolve(path)
        index = open_checkpoint(location.storage, location.name)
        if isinstance(index, Bundle):
            report = _export_tf(index, keys, suffix, target, progress)
        elif isinstance(index, ForeignCheckpoint):
            report = _export_foreign(index, keys, suffix, target, progress)
        else:
            report = _export(location.storage, index, keys, suffix, target, progress)
        os.replace(temp, out_path)
    except BaseException as exc:
        target.close()
        Path(temp).unlink(missing_ok=True)
        if isinstance(exc, ChecksumError):
            shown = path.url if isinstance(path, Location) else os.fspath(path)
            raise ChecksumError(f"{exc} - the checkpoint is damaged: nothing was written to {out_path}; "
                                f"'cloudckpt verify {shown}' lists every damaged key", exc.url, key=exc.key) from exc
        raise
    return replace(report, path=out_path)


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


def _arrays(storage: Storage, index: CheckpointIndex, entries: Sequence[tuple[str, ArrayEntry]],
            progress: ProgressSink) -> Iterator[tuple[str, NDArray[Any]]]:
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
                  progress: ProgressSink) -> Iterator[tuple[str, NDArray[Any]]]:
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


def _flush(bundle: Bundle, names: list[str], progress: ProgressSink) -> Iterator[tuple[str, NDArray[Any]]]:
    values = bundle.read(names)
    for name in names:
        progress.update(values[name].nbytes)
        yield name, values[name]


def _plan(index: CheckpointIndex, url: str, keys: Sequence[str], safetensors: bool,
          ) -> tuple[list[tuple[str, ArrayEntry]], list[tuple[str, ValueEntry]], list[tuple[str, str]]]:
    """Arrays and values to write, and what is skipped: ``(path, "what it is|plural")``.

    Raises:
        NothingToExportError: a KEY selects no array or value (naming every such KEY).
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
        raise NothingToExportError(f"{url}: no array or value matches {', '.join(map(repr, unmatched))}"
                                   f"{_hint(index, next(iter(unmatched)))} (a KEY selects a key path equal to it "
                                   f"or continuing it with '/' or '.'; see cloudckpt inspect for the keys)", url)
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
        raise NotFoundError(f"cannot write {out_path}: its directory {directory} does not exist",
                            str(directory)) from None
    except NotADirectoryError:
        raise NotFoundError(f"cannot write {out_path}: {directory} is not a directory", str(directory)) from None
    except PermissionError:
        raise PermissionDeniedError(f"cannot write {out_path}: permission denied in {directory}",
                                    str(directory)) from None
    except OSError as exc:
        raise StorageError(f"cannot write {out_path}: {exc.strerror or exc}", str(out_path)) from None


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


def _export(storage: Storage, index: CheckpointIndex, keys: Sequence[str], suffix: str, target: _Temp,
            progress: ProgressFactory) -> ExportReport:
    name = index.name
    arrays, values, skipped = _plan(index, storage.url_for(name), keys, suffix == ".safetensors")
    if skipped:
        log.warning("%s", skipped_summary(skipped, suffix))
    if not arrays and not values:
        what = f"keys matching {', '.join(keys)}" if keys else "arrays or values"
        raise NothingToExportError(f"{storage.url_for(name)} has no {what} that {suffix} can hold",
                                   storage.url_for(name))
    total = sum(array_nbytes(entry) for _, entry in arrays)

    def write(out: IO[bytes], progress: ProgressSink) -> None:
        stream = _arrays(storage, index, arrays, progress)
        if suffix == ".npz":
            write_npz(out, stream, values)
        else:
            layout = [(path, entry.dtype, entry.shape, array_nbytes(entry)) for path, entry in arrays]
            metadata = json.dumps(dict(index.metadata), default=str)
            write_safetensors(out, stream, layout, {"cloudckpt_checkpoint": name, "cloudckpt_metadata": metadata})

    _write_into(target, total, f"export {name}", progress, write)
    return ExportReport(Path(), "cloudckpt", len(arrays), len(values), total, tuple(path for path, _ in skipped))


def _export_tf(bundle: Bundle, keys: Sequence[str], suffix: str, target: _Temp,
               progress: ProgressFactory) -> ExportReport:
    """Export a TensorFlow checkpoint's tensors, named by object path."""
    tensors, skipped = export_plan(bundle, keys, suffix == ".safetensors", frozenset(SAFETENSORS_DTYPES))
    if suffix == ".npz":
        strings = [t for t in tensors if t.dtype == "string"]
        tensors = [t for t in tensors if t.dtype != "string"]
    else:
        strings = []
    if not tensors and not strings:
        what = f"keys matching {', '.join(keys)}" if keys else "tensors"
        raise NothingToExportError(f"{bundle.url} has no {what} to export", bundle.url)
    texts: list[tuple[str, NDArray[Any]]] = []
    for name, value in bundle.read([t.name for t in strings]).items():
        fixed = npz_strings(name, value)
        if fixed is None:
            skipped.append(f"{name} (strings ending in NUL bytes: numpy's S dtype would drop them)")
        else:
            texts.append((name, fixed))
    if skipped:
        log.warning("not exported, the %s format cannot hold them: %s", suffix, "; ".join(skipped))
    total = sum(t.nbytes for t in tensors)

    def write(out: IO[bytes], progress: ProgressSink) -> None:
        stream = export_arrays(bundle, tensors, BATCH_BYTES, progress)
        if suffix == ".npz":
            write_npz(out, itertools.chain(stream, texts), [])
        else:
            layout = [(t.name, _dtype_name(t), t.shape, t.nbytes) for t in tensors]
            write_safetensors(out, stream, layout, {"cloudckpt_checkpoint": bundle.name,
                                                     "cloudckpt_format": TF_FORMAT})

    _write_into(target, total, f"export {bundle.name}", progress, write)
    return ExportReport(Path(), TF_FORMAT, len(tensors) + len(texts), 0, total, tuple(skipped))


def _export_foreign(foreign: ForeignCheckpoint, keys: Sequence[str], suffix: str, target: _Temp,
                    progress: ProgressFactory) -> ExportReport:
    """Export another foreign format's tensors by name, read one at a time through its reader."""
    chosen: list[ForeignTensor] = []
    skipped: list[str] = []
    unmatched = dict.fromkeys(keys)
    for tensor in foreign_tensors(foreign):
        hits = [k for k in keys if key_matches(tensor.name, k)]
        if keys and not hits:
            continue
        for key in hits:
            unmatched.pop(key, None)
        if tensor.dtype == "object" or (suffix == ".safetensors" and tensor.dtype not in SAFETENSORS_DTYPES):
            skipped.append(f"{tensor.name} ({tensor.dtype})")
        else:
            chosen.append(tensor)
    if unmatched:
        raise NothingToExportError(f"{foreign.url}: no tensor matches {', '.join(map(repr, unmatched))} "
                                   f"(see cloudckpt inspect for the names)", foreign.url)
    if skipped:
        log.warning("not exported, the %s format cannot hold them: %s", suffix, "; ".join(skipped))
    if not chosen:
        raise NothingToExportError(f"{foreign.url} has no tensors that {suffix} can hold", foreign.url)
    total = sum(t.nbytes for t in chosen)
    kind = format_name(foreign.format)

    def tensors(sink: ProgressSink) -> Iterator[tuple[str, NDArray[Any]]]:
        for tensor in chosen:
            value = np.asarray(foreign.reader.get_tensor(tensor.name), order="C")
            sink.update(value.nbytes)
            yield tensor.name, value

    def write(out: IO[bytes], sink: ProgressSink) -> None:
        if suffix == ".npz":
            write_npz(out, tensors(sink), [])
        else:
            layout = [(t.name, t.dtype, t.shape, t.nbytes) for t in chosen]
            write_safetensors(out, tensors(sink), layout, {"cloudckpt_checkpoint": foreign.url,
                                                           "cloudckpt_format": kind})

    _write_into(target, total, f"export {foreign.url}", progress, write)
    return ExportReport(Path(), kind, len(chosen), 0, total, tuple(skipped))


def _dtype_name(tensor: Tensor) -> str:
    assert tensor.numpy_dtype is not None
    return tensor.numpy_dtype.name


def _write_into(target: _Temp, total: int, description: str, progress_factory: ProgressFactory,
                write: Callable[[IO[bytes], ProgressSink], None]) -> None:
    """Run ``write`` into the temporary file (made by ``_temp_file``) and fsync it."""
    with os.fdopen(target.take(), "wb") as out, reporting(progress_factory, total, description) as progress:
        umask = os.umask(0o22)
        os.umask(umask)
        os.fchmod(out.fileno(), 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
        write(out, progress)
        out.flush()
        os.fsync(out.fileno())
