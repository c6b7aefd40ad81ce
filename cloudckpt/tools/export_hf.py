"""``export_hf``: a checkpoint's weights as Hugging Face sharded safetensors, for serving.

Writes ``model-0000k-of-0000N.safetensors`` and ``model.safetensors.index.json`` (``weight_map``:
tensor name -> shard file; ``metadata.total_size``) into a directory - the layout
``transformers``' ``from_pretrained`` and ``safetensors.torch.load_file`` read.

Names: a key path's segments, decoded (``~1`` back to ``/``, an int key back to its digits)
and joined with ``.``, as PyTorch names parameters: a model saved as
``Checkpoint(model=model)`` has key paths ``model/transformer.h.0.attn.c_attn.weight``;
``prefix="model/"`` selects them and ``strip_prefix`` drops the prefix, giving the names
``load_state_dict`` expects (``transformer.h.0.attn.c_attn.weight``). A Lightning checkpoint's
weights are under ``lightning/state_dict/``.

Memory: shards are planned from the index alone (greedy, in key order, a new shard when the
next tensor would pass ``max_shard_size``; a larger tensor gets a shard of its own, as
``transformers`` does), then written one after the other. Each shard's tensors are fetched by
``cloudckpt.tools.export``'s bounded-batch reader - parallel ranged reads of exactly the
chunks each tensor needs, CRC32C-checked - and streamed into the shard file, so a checkpoint
sharded over many hosts is never gathered whole: at most one batch (and one tensor) is in
memory. bfloat16 and float8 stay what they are.

Atomicity: every shard goes to a temporary file that is renamed into place, and the index
JSON - the file a loader opens first - is written last, the same way; a failed export
removes what it wrote.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import InvalidURLError
from cloudckpt.format import ArrayEntry, CheckpointIndex, decode_segment
from cloudckpt.format.sniff import ForeignCheckpoint
from cloudckpt.storage import CheckpointPath, Storage, resolve
from cloudckpt.tfbundle import Bundle
from cloudckpt.tools.export import NothingToExportError, _arrays, _plan, _temp_file, skipped_summary
from cloudckpt.tools.export_formats import SAFETENSORS_DTYPES, write_safetensors
from cloudckpt.tools.foreign import ForeignTensor, foreign_tensors, open_checkpoint
from cloudckpt.tools.inspect import array_nbytes
from cloudckpt.tools.progress import ProgressFactory, ProgressSink, reporting, silent

log = logging.getLogger("cloudckpt.tools")

#: What ``transformers`` reads: the index file and the shard file names.
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{k:05d}-of-{n:05d}.safetensors"
#: ``transformers``' own default shard size (``save_pretrained(max_shard_size="5GB")``).
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True, slots=True)
class HFExportReport:
    """What :func:`export_hf` wrote.

    Attributes:
        directory: the output directory.
        shards: the shard files, in order.
        tensors: tensors written (over all shards).
        bytes: bytes of tensor data written.
        skipped: key paths the safetensors format cannot hold (inline values, opaque bytes, ...).
    """

    directory: Path
    shards: tuple[str, ...]
    tensors: int
    bytes: int
    skipped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    source: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    entry: ArrayEntry | None


def hf_name(path: str, prefix: str, strip_prefix: bool) -> str:
    """The Hugging Face name of key path ``path`` (see the module docs)."""
    if strip_prefix and prefix:
        path = path[len(prefix):].lstrip("/")
    return ".".join(str(decode_segment(segment)) for segment in path.split("/"))


def plan_shards(tensors: Sequence[Any], max_shard_size: int) -> list[list[Any]]:
    """Tensors (anything with ``nbytes``) grouped into shards of at most ``max_shard_size`` bytes,
    in order; a tensor larger than that is a shard of its own."""
    shards: list[list[Any]] = []
    size = 0
    for tensor in tensors:
        if not shards or (shards[-1] and size + tensor.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def export_hf(path: CheckpointPath, out_dir: str | os.PathLike[str], *, prefix: str = "",
              strip_prefix: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
              progress: ProgressFactory = silent) -> HFExportReport:
    """Write the checkpoint at ``path``'s arrays under ``prefix`` as Hugging Face sharded safetensors.

    Raises:
        InvalidURLError: ``max_shard_size`` is not positive, or ``strip_prefix`` without ``prefix``.
        FileExistsError: ``out_dir`` already holds an index or shards, and not ``force``.
        NothingToExportError: ``prefix`` selects no array safetensors can hold.
        ValueError: two key paths give the same name (names them both).
        ChecksumError: the checkpoint is damaged (the files written so far are removed).
    """
    if max_shard_size <= 0:
        raise InvalidURLError(f"max_shard_size must be positive, got {max_shard_size}", str(out_dir))
    if strip_prefix and not prefix:
        raise InvalidURLError("strip_prefix needs a prefix (e.g. --prefix model/)", str(out_dir))
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in directory.iterdir() if p.name == INDEX_FILE or
                      (p.name.startswith("model-") and p.name.endswith(".safetensors")))
    if existing and not force:
        raise FileExistsError(f"{directory} already holds {', '.join(existing[:3])} (use --force to replace them)")
    location = resolve(path)
    index = open_checkpoint(location.storage, location.name)
    tensors, skipped = _select(location.storage, index, prefix, strip_prefix)
    shards = plan_shards(tensors, max_shard_size)
    names = [SHARD_FILE.format(k=k + 1, n=len(shards)) for k in range(len(shards))]
    written: list[Path] = []
    total = sum(t.nbytes for t in tensors)
    try:
        with reporting(progress, total, f"export {location.url}") as sink:
            for name, shard in zip(names, shards, strict=True):
                stream = _read(location.storage, index, shard, sink)
                layout = [(t.name, t.dtype, t.shape, t.nbytes) for t in shard]
                _write_file(directory / name, written, functools.partial(
                    _write_shard, stream=stream, layout=layout))
        doc = {"metadata": {"total_size": total},
               "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard}}
        body = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        _write_file(directory / INDEX_FILE, written, functools.partial(_write_bytes, body=body))
    except BaseException:
        for done in written:
            done.unlink(missing_ok=True)
        raise
    for stale in existing:  # a forced export with fewer shards than the one it replaces
        if stale not in names and stale != INDEX_FILE:
            (directory / stale).unlink(missing_ok=True)
    return HFExportReport(directory, tuple(names), len(tensors), total, tuple(skipped))


def _select(storage: Storage, index: CheckpointIndex | Bundle | ForeignCheckpoint, prefix: str,
            strip_prefix: bool) -> tuple[list[_Tensor], list[str]]:
    """The tensors to write (named), and the key paths skipped; refuses names that collide."""
    keys = [prefix] if prefix else []
    if isinstance(index, CheckpointIndex):
        arrays, _, skipped_pairs = _plan(index, storage.url_for(index.name), keys, True)  # no values: safetensors
        skipped = [p for p, _ in skipped_pairs]
        if skipped_pairs:
            log.warning("%s", skipped_summary(skipped_pairs, ".safetensors"))
        tensors = [_Tensor(hf_name(p, prefix, strip_prefix), p, e.dtype, e.shape, array_nbytes(e), e)
                   for p, e in arrays]
        url = storage.url_for(index.name)
    elif isinstance(index, ForeignCheckpoint):
        found: list[ForeignTensor] = [t for t in foreign_tensors(index) if not prefix or t.name.startswith(prefix)]
        skipped = [t.name for t in found if t.dtype not in SAFETENSORS_DTYPES]
        tensors = [_Tensor(t.name[len(prefix):] if strip_prefix else t.name, t.name, t.dtype, t.shape, t.nbytes,
                           None) for t in found if t.dtype in SAFETENSORS_DTYPES]
        url = index.url
    else:
        raise InvalidURLError(f"{index.url} is a TensorFlow checkpoint: export it with 'cloudckpt export' to "
                              f"one .safetensors file", index.url)
    if not tensors:
        raise NothingToExportError(f"{url} has no arrays {f'under {prefix!r} ' if prefix else ''}that "
                                   f"safetensors can hold", url)
    seen: dict[str, str] = {}
    for tensor in tensors:
        if tensor.name in seen:
            raise ValueError(f"{url}: {seen[tensor.name]!r} and {tensor.source!r} both export as {tensor.name!r}")
        seen[tensor.name] = tensor.source
    return tensors, skipped


def _read(storage: Storage, index: CheckpointIndex | Bundle | ForeignCheckpoint, shard: Sequence[_Tensor],
          sink: ProgressSink) -> Iterator[tuple[str, NDArray[Any]]]:
    """One shard's tensors in order, read in bounded batches (a foreign reader: one at a time)."""
    if isinstance(index, CheckpointIndex):
        entries = [(t.source, t.entry) for t in shard if t.entry is not None]
        for (_, array), tensor in zip(_arrays(storage, index, entries, sink), shard, strict=True):
            yield tensor.name, array
        return
    assert isinstance(index, ForeignCheckpoint)
    for tensor in shard:
        value = np.ascontiguousarray(index.reader.get_tensor(tensor.source))
        sink.update(value.nbytes)
        yield tensor.name, value


def _write_shard(out: IO[bytes], *, stream: Iterator[tuple[str, NDArray[Any]]],
                 layout: Sequence[tuple[str, str, tuple[int, ...], int]]) -> None:
    """One shard file; ``format: pt`` is the metadata ``transformers`` checks for PyTorch weights."""
    write_safetensors(out, stream, layout, {"format": "pt"})


def _write_bytes(out: IO[bytes], *, body: bytes) -> None:
    out.write(body)


def _write_file(final: Path, written: list[Path], write: Callable[[IO[bytes]], None]) -> None:
    """``write(out)`` into a temporary file next to ``final``, fsynced and renamed to it."""
    fd, temp = _temp_file(final)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, final)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    written.append(final)
