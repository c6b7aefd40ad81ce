"""One TensorFlow checkpoint (TensorBundle) opened for reading, from any cloudckpt store.

A checkpoint ``<dir>/<name>`` is ``<name>.index`` (a table of entries, ``table.py`` and
``entries.py``) and ``<name>.data-0000k-of-0000N`` shards holding the tensors' bytes.
Opening one reads the index (one GET, its size checked by HEAD first) and validates it
whole; reading tensors then fetches only their byte ranges, in parallel, straight into the
destination arrays (``reader.read_coalesced``, the path cloudckpt's own restore takes), and
checks every tensor's CRC32C before returning it.

Trust: the index is untrusted input. Every data range must lie inside its shard as the
store reports the shard's size (HEAD) before anything is allocated for it, so memory is
bounded by the checkpoint's real size; only this checkpoint's own ``.index`` and
``.data-*`` objects are ever read; every failure is a typed error naming the tensor.

Why one ~420-line module: ``Bundle`` is the one object a TensorFlow checkpoint is
opened as, and its reads and checks share its state; the wire format, table, entries,
object graph and string tensors already have modules of their own.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    ChecksumError,
    InvalidRangeError,
    NotFoundError,
)
from cloudckpt.format import CheckpointIndex, decode_segment, index_key
from cloudckpt.format.partition import partition_problem
from cloudckpt.format.sniff import IndexFormat, sniff_index
from cloudckpt.format.sniff import load_any_index as sniffed_index
from cloudckpt.restoring.array_reads import read_coalesced
from cloudckpt.storage import ReadRequest, Storage
from cloudckpt.storage.checksum import crc32c_of
from cloudckpt.tfbundle.entries import (
    DT_STRING,
    Entry,
    Header,
    decode_entry,
    decode_header,
    dtype_label,
    readable,
    slice_box,
    slice_key,
)
from cloudckpt.tfbundle.objects import OBJECT_GRAPH_KEY, SLOT_SEGMENT, assign_names, object_paths
from cloudckpt.tfbundle.strings import decode_strings
from cloudckpt.tfbundle.table import read_table

#: Cells (or corner coordinates) the proof that a tensor's slices tile it may use, per slice
#: dimension: memory linear in the slices the index holds (``_check_tiling``). Enough for any
#: layout split along at most 4 dimensions (corner counting: ``2^4`` corners per box
#: dimension), and for any grid (one cell per slice).
SLICE_PROOF_BUDGET = 16

def is_bundle_index(data: bytes) -> bool:
    """Whether an ``.index`` object's bytes are a TensorFlow table rather than cloudckpt's JSON.

    Decided by content, never by the checkpoint's name (``cloudckpt.format.sniff.sniff_index``).
    """
    return sniff_index(data) is IndexFormat.TENSORFLOW


def data_object(name: str, shard: int, num_shards: int) -> str:
    """The key of one data shard (TensorFlow's ``DataFilename``)."""
    return f"{name}.data-{shard:05d}-of-{num_shards:05d}"


@dataclass(frozen=True, slots=True)
class Tensor:
    """What the index says about one tensor a user saved.

    Attributes:
        name: the object path (``model/dense/kernel``) or, without one, the raw key.
        key: the raw bundle key (``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``).
        dtype: TensorFlow's dtype name (``float32``, ``bfloat16``, ``string``, ``resource``).
        shape: the full shape (of the whole tensor, for a partitioned one).
        nbytes: bytes it takes in the data shards.
        slices: how many slices a partitioned tensor is stored in (0: stored whole).
        numpy_dtype: the dtype it reads as (``object`` for strings); ``None`` for the
            resource/variant tensors that cannot be read.
    """

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    slices: int
    numpy_dtype: np.dtype[Any] | None


class Bundle:
    """A TensorFlow checkpoint: its validated index, and reads of its tensors.

    Built from the index bytes the caller already fetched (it needed them to tell the
    format), so opening costs no second GET.
    """

    def __init__(self, storage: Storage, name: str, index_bytes: bytes) -> None:
        self.storage = storage
        self.name = name
        self.url = storage.url_for(name)
        self.index_url = storage.url_for(index_key(name))
        self.index_bytes = index_bytes  # kept: ``cloudckpt cp`` copies it as-is
        rows = read_table(index_bytes, self.index_url)
        first = next(rows, None)
        if first is None or first[0] != b"":
            raise CheckpointFormatError(f"malformed TensorFlow checkpoint index {self.index_url}: "
                                        "no header entry (the empty key) first")
        self.header: Header = decode_header(first[1], self.index_url)
        self.entries: dict[str, Entry] = {}
        for raw, value in rows:
            key = raw.decode("utf-8", "surrogateescape")
            self.entries[key] = decode_entry(key, value, self.index_url)
        self.objects = tuple(data_object(name, i, self.header.num_shards) for i in range(self.header.num_shards))
        self._slice_entries: dict[str, list[tuple[Entry, tuple[int, ...], tuple[int, ...]]]] = {}
        for entry in self.entries.values():
            self._check_entry(entry)
        #: Raw keys of the tensors a user saved: no slice entries, no object graph.
        self.keys = [k for k, e in self.entries.items() if not k.startswith("\x00") and k != OBJECT_GRAPH_KEY]
        self._names: dict[str, str] | None = None
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()  # guards _sizes
        self._names_lock = threading.Lock()  # held while the object graph is read (which takes _lock)

    # ------------------------------------------------------------------ validation
    def _fail(self, entry: Entry, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"malformed TensorFlow checkpoint index {self.index_url}: "
                                     f"tensor {entry.key!r}: {problem}")

    def _check_entry(self, entry: Entry) -> None:
        if not entry.slices:
            if entry.shard >= self.header.num_shards:
                raise self._fail(entry, f"shard {entry.shard} of a {self.header.num_shards}-shard checkpoint")
            return
        if entry.key.startswith("\x00"):
            raise self._fail(entry, "a slice entry that has slices itself")
        parts = []
        for extents in entry.slices:
            start, shape = slice_box(entry, extents)
            if math.prod(shape) == 0:
                continue
            part = self.entries.get(slice_key(entry.key, extents))
            if part is None:
                raise self._fail(entry, f"slice at {list(start)} of shape {list(shape)} has no entry")
            if part.dtype != entry.dtype or part.shape != shape or part.slices:
                raise self._fail(entry, f"slice at {list(start)}: entry is {dtype_label(part.dtype)} "
                                        f"{list(part.shape)}, expected {dtype_label(entry.dtype)} {list(shape)}")
            parts.append((part, start, shape))
        _check_tiling(self, entry, parts)
        self._slice_entries[entry.key] = parts

    # ------------------------------------------------------------------ names
    @property
    def names(self) -> dict[str, str]:
        """Display name -> raw key for every listed tensor (object paths where the graph has them).

        Reading the object graph costs one small ranged read, done on first use.
        """
        with self._names_lock:
            if self._names is None:
                paths: dict[str, str] = {}
                graph = self.entries.get(OBJECT_GRAPH_KEY)
                if graph is not None and graph.dtype == DT_STRING and graph.shape == ():
                    value = self._read([(OBJECT_GRAPH_KEY, graph)])[OBJECT_GRAPH_KEY]
                    paths = object_paths(bytes(value[()]), self.index_url)
                self._names = {name: key for key, name in assign_names(self.keys, paths).items()}
            return self._names

    def resolve(self, name: str) -> str:
        """The raw key of a display name or raw key; ``KeyError`` if neither."""
        key = self.names.get(name)
        if key is None and name in self.entries and not name.startswith("\x00"):
            key = name
        if key is None:
            raise KeyError(f"{name!r} is not in TensorFlow checkpoint {self.url}")
        return key

    def tensors(self) -> list[Tensor]:
        """Every tensor a user saved, sorted by display name."""
        out = []
        for name, key in self.names.items():
            entry = self.entries[key]
            parts = self._slice_entries.get(key, [])
            nbytes = sum(p.size for p, _, _ in parts) if entry.slices else entry.size
            out.append(Tensor(name, key, dtype_label(entry.dtype), entry.shape, nbytes, len(entry.slices),
                              entry.np_dtype if readable(entry.dtype) else None))
        return sorted(out, key=lambda t: t.name)

    # ------------------------------------------------------------------ reading
    def read(self, names: Sequence[str]) -> dict[str, NDArray[Any]]:
        """The values of ``names`` (display names or raw keys), each CRC32C-checked.

        Numeric tensors come back as numpy arrays of their dtype (bfloat16 and float8 via
        ml_dtypes, quantized types as their integers), strings as object arrays of ``bytes``.

        Raises:
            KeyError: a name is not in the checkpoint.
            CheckpointFormatError: a resource/variant tensor (they hold no portable bytes),
                or an index that points outside a shard.
            ChecksumError: a tensor's bytes do not match their recorded CRC32C.
            CheckpointNotFoundError: a data shard is missing.
        """
        display = {key: name for name, key in self.names.items()}
        keys = {name: self.resolve(name) for name in names}
        values = self._read([(display.get(key, key), self.entries[key]) for key in keys.values()])
        return {name: values[display.get(key, key)] for name, key in keys.items()}

    def _read(self, wanted: Sequence[tuple[str, Entry]]) -> dict[str, NDArray[Any]]:
        requests: list[ReadRequest] = []
        checks: list[tuple[str, Entry, NDArray[Any] | bytearray, NDArray[Any], tuple[slice, ...] | None]] = []
        out: dict[str, NDArray[Any]] = {}
        for name, entry in wanted:
            if not readable(entry.dtype):
                raise CheckpointFormatError(
                    f"tensor {name!r} of TensorFlow checkpoint {self.url} is a {dtype_label(entry.dtype)} tensor: "
                    "it holds no portable values (TensorFlow-internal state), so it cannot be read without "
                    "TensorFlow")
            parts = self._slice_entries.get(entry.key, []) if entry.slices else [(entry, (0,) * len(entry.shape),
                                                                                  entry.shape)]
            for part, _, _ in parts:  # every byte inside its shard (HEAD) before anything is allocated
                self._check_range(part, name)
            dest = np.empty(entry.shape, dtype=entry.np_dtype)
            out[name] = dest
            for part, start, shape in parts:
                box: tuple[slice, ...] = tuple(slice(a, a + n) for a, n in zip(start, shape, strict=True))
                if part.dtype == DT_STRING:
                    raw = bytearray(part.size)
                    requests.append(ReadRequest(self.objects[part.shard], part.offset, memoryview(raw)))
                    checks.append((name, part, raw, dest, box))  # strings are placed by shape, not box
                    continue
                target = dest if part is entry else np.empty(shape, dtype=entry.np_dtype)
                if target.size:
                    requests.append(ReadRequest(self.objects[part.shard], part.offset,
                                                target.reshape(-1).view(np.uint8).data))
                checks.append((name, part, target, dest, None if part is entry else box))
        self._fetch(requests)
        for name, part, got, dest, where in checks:
            if isinstance(got, bytearray):
                values, crc = decode_strings(bytes(got), part.count, big_endian=self.header.big_endian,
                                             url=self.storage.url_for(self.objects[part.shard]), key=name)
                self._verify(name, part, crc)
                if part.shape == dest.shape:
                    dest.reshape(-1)[:] = values  # element by element (a 0-d assignment would nest the array)
                else:
                    dest[where] = values.reshape(part.shape)
                continue
            self._verify(name, part, crc32c_of([got.reshape(-1).view(np.uint8).data]) if got.size else 0)
            if self.header.big_endian:
                _byteswap(got)
            if where is not None:
                dest[where] = got
        return out

    def _verify(self, name: str, entry: Entry, actual: int) -> None:
        if actual != entry.crc32c:
            shard = self.storage.url_for(self.objects[entry.shard])
            what = f"tensor {name!r}" + (f" (key {entry.key!r})" if entry.key != name and
                                         not entry.key.startswith("\x00") else "")
            raise ChecksumError(
                f"checksum mismatch for {what} in {shard} bytes [{entry.offset}, {entry.offset + entry.size}): "
                f"recorded CRC32C {entry.crc32c:08x}, read {actual:08x}", shard, key=name)

    def shard_size(self, shard: int) -> int:
        """The real size of a data shard (one HEAD, remembered)."""
        with self._lock:
            known = self._sizes.get(shard)
        if known is not None:
            return known
        key = self.objects[shard]
        try:
            size = self.storage.head(key).size
        except NotFoundError as exc:
            raise CheckpointNotFoundError(f"data shard {self.storage.url_for(key)} of TensorFlow checkpoint "
                                          f"{self.url} is missing", self.storage.url_for(key), key=key) from exc
        with self._lock:
            self._sizes[shard] = size
        return size

    def _check_range(self, entry: Entry, name: str) -> None:
        """Refuse an entry whose bytes lie outside its shard, before anything is allocated for it."""
        if entry.size == 0:
            return
        size = self.shard_size(entry.shard)
        if entry.offset + entry.size > size:
            raise CheckpointFormatError(
                f"tensor {name!r} of TensorFlow checkpoint {self.url}: its index entry claims bytes "
                f"[{entry.offset}, {entry.offset + entry.size}) of {self.storage.url_for(self.objects[entry.shard])}, "
                f"which has {size} bytes (truncated shard, or a damaged index)")

    def _fetch(self, requests: Sequence[ReadRequest]) -> None:
        try:
            read_coalesced(self.storage, requests)
        except NotFoundError as exc:
            raise CheckpointNotFoundError(f"a data shard of TensorFlow checkpoint {self.url} is missing "
                                          f"(deleted while reading?): {exc}", self.url) from exc
        except InvalidRangeError as exc:
            raise CheckpointFormatError(f"a data shard of TensorFlow checkpoint {self.url} is shorter than "
                                        f"its index says (truncated?): {exc}") from exc

    # ------------------------------------------------------------------ entries that hold bytes
    @property
    def index_size(self) -> int:
        return len(self.index_bytes)

    def stored_entries(self, names: Mapping[str, str]) -> Iterator[tuple[str, Entry]]:
        """Every entry that holds bytes (slices one by one, the object graph too), named by ``names``.

        ``names`` maps raw keys to display names (keys it lacks are shown raw).
        """
        for key, entry in self.entries.items():
            if entry.slices:
                for n, (part, _, _) in enumerate(self._slice_entries.get(key, [])):
                    yield f"{names.get(key, key)} (slice {n + 1} of {len(entry.slices)})", part
            elif not key.startswith("\x00"):
                yield names.get(key, key), entry


def _check_tiling(bundle: Bundle, entry: Entry,
                  parts: Sequence[tuple[Entry, tuple[int, ...], tuple[int, ...]]]) -> None:
    """The slices cover the tensor exactly once, and no two hold the same bytes of a shard.

    Checked when the bundle is opened, so ``verify``, ``load_variable`` and listings give one
    verdict. Tiling is proven by ``boxes.partition_problem`` - the proof cloudckpt's own
    index gets for its chunks - with a budget of ``SLICE_PROOF_BUDGET`` cells (or corner
    coordinates) per slice dimension, so its memory and time grow with the slices the index
    holds, never with the shape they claim; a layout too irregular for that is refused
    (TensorFlow's partitioners cut along one dimension; its ``MaxShardSizePolicy`` peels slabs
    off along any, which takes many dimensions before it could be refused). Distinct
    bytes (a sort by shard and offset) then bound the tensor's array by the shard bytes its
    slices really hold - slices that all point at one row would otherwise make a tensor of
    any size out of it.
    """
    boxes = [(start, shape) for _, start, shape in parts]
    if sum(math.prod(shape) for _, shape in boxes) != math.prod(entry.shape):
        raise bundle._fail(entry, f"its {len(entry.slices)} slices do not cover the shape {list(entry.shape)} "
                                  "exactly")
    budget = SLICE_PROOF_BUDGET * max(len(boxes), 1) * max(len(entry.shape), 1)
    problem = partition_problem(entry.shape, boxes, budget=budget, noun="slice") if len(boxes) > 1 else None
    if problem is not None:
        raise bundle._fail(entry, f"its {len(entry.slices)} slices do not tile the shape {list(entry.shape)}: "
                                  f"{problem}")
    ranges = sorted((part.shard, part.offset, part.offset + part.size) for part, _, _ in parts if part.size)
    for (shard, _, end), (other, start, _) in itertools.pairwise(ranges):
        if shard == other and start < end:
            raise bundle._fail(entry, f"two of its slices share bytes [{start}, {end}) of shard {shard}")


def _byteswap(array: NDArray[Any]) -> None:
    """Big-endian bundle bytes to this machine's order, in place (complex: each half)."""
    unit = array.dtype.itemsize // 2 if array.dtype.kind == "c" else array.dtype.itemsize
    if unit > 1:
        array.reshape(-1).view(f"u{unit}").byteswap(inplace=True)


def nested(bundle: Bundle, prefix: str) -> dict[str, Any] | None:
    """The tensors under object path ``prefix`` as nested dicts (``None`` if there are none).

    Keys are the decoded local names, as ``load_variable("model")`` returns a subtree of a
    cloudckpt checkpoint; ``""`` is the root (every tensor). One batched read fetches them all.
    Optimizer slots (``<variable>/.OPTIMIZER_SLOT/...``) are left out: a variable is a leaf,
    so its slots cannot also hang below it (read them by their names).

    Raises:
        ValueError: some tensor is also the parent of another (no such tree exists).
    """
    head = prefix.rstrip("/") + "/" if prefix else ""
    inside = [n for n in bundle.names if n.startswith(head) and SLOT_SEGMENT not in n[len(head):].split("/")]
    if not inside:
        return None
    values = bundle.read(inside)
    tree: dict[str, Any] = {}
    for name in sorted(inside):
        node = tree
        segments = name[len(head):].split("/")
        for segment in segments[:-1]:
            child = node.setdefault(_segment(segment), {})
            if not isinstance(child, dict):
                raise ValueError(f"{prefix!r} of {bundle.url} cannot be read as one tree: a tensor is also the "
                                 f"parent of {name!r}; read the tensors one by one")
            node = child
        node[_segment(segments[-1])] = values[name]
    return tree


def _segment(segment: str) -> str:
    """The local name an object path segment stands for (segments are ``encode_segment`` of names)."""
    try:
        return str(decode_segment(segment))
    except CheckpointFormatError:
        return segment


def load_any_index(storage: Storage, name: str) -> CheckpointIndex | Bundle:
    """Checkpoint ``name``'s index, whichever format it is in: cloudckpt's, or a TensorFlow bundle.

    ``cloudckpt.format.sniff.load_any_index`` (one HEAD and one GET of the ``.index`` object; the
    format is told from its bytes), with a TensorFlow checkpoint handed back as its
    :class:`Bundle` - for code above the core (the CLI, ``cloudckpt.tools``).

    Raises:
        CheckpointFormatError: the bytes are neither (a truncated TensorFlow index has lost
            its magic number), the index they hold is malformed, or they are another
            foreign format.
    """
    found = sniffed_index(storage, name)
    if isinstance(found, CheckpointIndex):
        return found
    if isinstance(found.source, Bundle):
        return found.source
    raise CheckpointFormatError(f"{found.url} is a {found.format.value}, not cloudckpt's or TensorFlow's", found.url)


def tensor_value(array: NDArray[Any]) -> Any:
    """A value as ``tf.train.load_checkpoint(...).get_tensor`` returns it: a 0-d tensor as a scalar."""
    return array[()] if array.ndim == 0 else array
