"""The on-store format: object names, key paths, dtypes and the index (manifest).

A checkpoint at ``<dir>/<name>`` is the object ``<name>.index`` (JSON, written last: its
presence is the commit) plus data objects ``<name>.data-0000k-of-0000N.<suffix>``, whose
suffix is unique to the write that made them. docs/format.md is the human-readable
specification; this module is the only code that encodes or decodes it.

Why everything here is validated strictly: an index is read from a bucket other people
may write to. A hostile or truncated index must end in ``CheckpointFormatError`` - never
an ``IndexError`` deep in the reader, a huge allocation, a read outside the checkpoint's
own objects, or (since nothing is pickled) code execution.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, cast

import numpy as np

from cloudckpt.boxes import partition_problem
from cloudckpt.chunks import Chunk as Chunk  # re-exported: part of the index model
from cloudckpt.chunks import ChunkGrid, as_grid, grid_from_json, grid_to_json
from cloudckpt.errors import CheckpointFormatError, CheckpointVersionError
from cloudckpt.storage.keys import SPREAD_INFIX as SPREAD_INFIX  # re-exported: part of the naming scheme

#: Bump on any change a reader of the previous version could misread (docs/format.md has each).
#: Version 2 added references (incremental saves), the ``bytes`` array pytype and the optional
#: top-level ``dcp`` field (torch.distributed.checkpoint's metadata).
FORMAT_VERSION = 2
#: Versions this reader understands; every earlier version stays readable.
READABLE_VERSIONS = frozenset({1, 2})
FORMAT_NAME = "cloudckpt-index"

INDEX_SUFFIX = ".index"
DATA_INFIX = ".data-"

#: Sanity bounds a hostile index cannot exceed (far above anything real).
MAX_NDIM = 64
MAX_BYTES = 2**53
MAX_CHUNKS_PER_ARRAY = 1 << 16
#: Longest key path (characters): the only bound on nesting depth (walks are iterative).
MAX_KEY_PATH = 1 << 16
MAX_ITEMSIZE = 1 << 20

#: Types of JSON leaves (small Python values stored inline in the index).
ValueType = Literal["none", "bool", "int", "float", "str"]
#: What Python type an array leaf had, so restore can rebuild it (a tensor stays a tensor).
#: ``bytes``: an opaque byte string (1-D uint8), handed back as ``bytes`` and never
#: interpreted (torch.distributed.checkpoint's serialized non-tensor items).
ArrayPyType = Literal["ndarray", "variable", "numpy_scalar", "tensor", "bytes"]
#: Container kinds of inner nodes.
NodeType = Literal["object", "dict", "list", "tuple"]

VALUE_TYPES: frozenset[str] = frozenset({"none", "bool", "int", "float", "str"})
ARRAY_PYTYPES: frozenset[str] = frozenset({"ndarray", "variable", "numpy_scalar", "tensor", "bytes"})
NODE_TYPES: frozenset[str] = frozenset({"object", "dict", "list", "tuple"})
#: Adapters that turn an object's state into a structure and back (see adapters/).
ADAPTERS: frozenset[str] = frozenset({"state_dict", "numpy_generator", "python_random", "torch_generator"})

#: dtypes numpy lacks natively, named as ml_dtypes names them (its types have numpy's void kind).
ML_DTYPE_NAMES: tuple[str, ...] = (
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn",
    "int2", "int4", "uint2", "uint4")


@functools.cache
def _ml_dtypes() -> dict[str, np.dtype[Any]]:
    """The ml_dtypes types this ml_dtypes has, by name, imported on first need.

    Why lazily: ml_dtypes 0.7 spends ~0.5 s importing its extension module, which every
    ``import cloudckpt`` paid - each CLI call, each spawned rank - though only a checkpoint
    holding one of these types needs it (an array of one means ml_dtypes is imported already).
    """
    import ml_dtypes

    return {name: np.dtype(getattr(ml_dtypes, name)) for name in ML_DTYPE_NAMES if hasattr(ml_dtypes, name)}


def ml_dtype(name: str) -> np.dtype[Any] | None:
    """The ml_dtypes type called ``name``, or ``None`` where this ml_dtypes lacks it (imports ml_dtypes)."""
    return _ml_dtypes().get(name)


_NATIVE_KINDS = frozenset("biufcUSmM")


# ---------------------------------------------------------------------------- names
def index_key(name: str) -> str:
    """The index object of checkpoint ``name`` (relative to its directory)."""
    return name + INDEX_SUFFIX


def data_key(name: str, shard: int, num_shards: int, suffix: str, *, spread: bool = False) -> str:
    """Data object ``shard`` of ``num_shards``; ``suffix`` is unique to one write.

    ``spread`` (a save of many objects to a store that partitions by key prefix, version 2):
    the object goes under ``<name>.d/<2 hex>/``, the two characters a hash of its own name,
    so thousands of hosts uploading at once hit up to 256 prefixes instead of one.
    """
    base = f"{name}{DATA_INFIX}{shard:05d}-of-{num_shards:05d}.{suffix}"
    return _spread_key(name, base) if spread else base


def _spread_key(name: str, base: str) -> str:
    return f"{name}{SPREAD_INFIX}{hashlib.blake2s(base.encode(), digest_size=1).hexdigest()}/{base}"


#: Any data object (``<name>.data-0000k-of-0000N.<suffix>``, possibly under ``<name>.d/<hh>/``);
#: group ``name`` is its checkpoint (``object_checkpoint`` also checks a spread object's directory).
DATA_OBJECT = re.compile(r"(?:(?P<dir>[^/]+)\.d/[0-9a-f]{2}/)?"
                         r"(?P<name>[^/]+)\.data-\d{5}-of-\d{5}\.[A-Za-z0-9_-]{1,64}")
#: A piece's strong content hash, as recorded (version 2): the algorithm, then the digest.
CONTENT_HASH = re.compile(r"xxh3_128:[0-9a-f]{32}")
#: A checkpoint name an index may reference (version 2): one path segment, no control characters.
_CHECKPOINT_NAME = re.compile(r"[^/\\\x00-\x1f]{1,512}")


# ---------------------------------------------------------------------------- key paths
def encode_segment(key: object) -> str:
    """One path segment for a dict key, keeping its type.

    ``str`` keys are kept readable with ``~`` escapes (``~0`` = ``~``, ``~1`` = ``/``,
    ``~2`` = a leading ``#``, ``~3`` = the empty string); other key types get a ``#``
    tag: ``#0`` is the int 0 (PyTorch optimizers key their state by int), ``#true``,
    ``#null``, ``#f:0.5``. List and tuple items use plain decimal indexes (the node's
    type tells them apart).

    Raises:
        ValueError: for key types that cannot round-trip (tuples, objects, ...).
    """
    if isinstance(key, str):
        if key == "":
            return "~3"
        text = key.replace("~", "~0").replace("/", "~1")
        return "~2" + text[1:] if text.startswith("#") else text
    if isinstance(key, bool):
        return "#true" if key else "#false"
    if isinstance(key, int):
        return f"#{key}"
    if key is None:
        return "#null"
    if isinstance(key, float):
        return f"#f:{key!r}"
    raise ValueError(f"dict keys must be str, int, float, bool or None to be checkpointed, "
                     f"got {type(key).__name__} key {key!r}")


_INT_RE = re.compile(r"-?[0-9]{1,400}")
_INDEX_RE = re.compile(r"0|[1-9][0-9]{0,11}")


def decode_segment(segment: str) -> object:
    """Inverse of ``encode_segment``; ``CheckpointFormatError`` on anything else."""
    if segment.startswith("#"):
        body = segment[1:]
        if body == "true":
            return True
        if body == "false":
            return False
        if body == "null":
            return None
        if body.startswith("f:"):
            try:
                return float(body[2:])
            except ValueError:
                raise CheckpointFormatError(f"bad float key segment {segment!r}") from None
        if _INT_RE.fullmatch(body):
            return int(body)
        raise CheckpointFormatError(f"bad typed key segment {segment!r}")
    if segment == "~3":
        return ""
    if not segment:
        raise CheckpointFormatError("empty key segment")
    out = []
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch == "/":
            raise CheckpointFormatError(f"unescaped '/' in key segment {segment!r}")
        if ch == "~":
            code = segment[i + 1:i + 2]
            if code == "0":
                out.append("~")
            elif code == "1":
                out.append("/")
            elif code == "2" and i == 0:
                out.append("#")
            else:
                raise CheckpointFormatError(f"bad escape in key segment {segment!r}")
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def join_path(parent: str, segment: str) -> str:
    """Child path; the root node's path is ``""``."""
    return f"{parent}/{segment}" if parent else segment


def parent_path(path: str) -> tuple[str, str]:
    """``(parent, last segment)`` of a non-root path."""
    if "/" in path:
        parent, seg = path.rsplit("/", 1)
        return parent, seg
    return "", path


# ---------------------------------------------------------------------------- dtypes
def dtype_name(dtype: np.dtype[Any]) -> str:
    """The stored name of a dtype; ``ValueError`` for dtypes a checkpoint cannot hold."""
    if dtype.kind == "V" and dtype.fields is None:
        for name, known in _ml_dtypes().items():
            if dtype == known:
                return name
    if dtype.kind not in _NATIVE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"dtype {dtype} cannot be checkpointed (object, structured and void "
                         f"dtypes are refused: they could hold Python objects)")
    if dtype.kind in "USmM":
        return storage_dtype(dtype).str
    return storage_dtype(dtype).name


def parse_dtype(name: object) -> np.dtype[Any]:
    """The dtype a stored name means; ``CheckpointFormatError`` for anything unknown."""
    if not isinstance(name, str) or not 0 < len(name) <= 40:
        raise CheckpointFormatError(f"dtype must be a short string, got {name!r}")
    if name in ML_DTYPE_NAMES:
        known = ml_dtype(name)
        if known is None:
            raise CheckpointFormatError(f"dtype {name!r} needs a newer ml_dtypes than the one installed")
        return known
    if not re.fullmatch(r"[<|]?[A-Za-z0-9\[\]]+", name):
        raise CheckpointFormatError(f"unknown dtype {name!r}")
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        raise CheckpointFormatError(f"unknown dtype {name!r}") from None
    if (dtype.kind not in _NATIVE_KINDS or dtype.fields is not None or dtype.subdtype is not None
            or not 0 < dtype.itemsize <= MAX_ITEMSIZE):
        raise CheckpointFormatError(f"dtype {name!r} is not allowed in a checkpoint")
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def storage_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The byte order data objects use: little-endian (numpy's ``=`` on every target we run)."""
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


# ---------------------------------------------------------------------------- index model
@dataclass(frozen=True, slots=True)
class ArrayEntry:
    """An array leaf: dtype, global shape, Python type to rebuild, and its chunks.

    ``chunks`` is a tuple of ``Chunk``, or (many shards on a grid, version 2) a ``ChunkGrid``:
    the same ``Sequence[Chunk]`` to a reader, kept as columns (``cloudckpt.chunks``).
    """

    dtype: str
    shape: tuple[int, ...]
    pytype: ArrayPyType
    chunks: Sequence[Chunk]


@dataclass(frozen=True, slots=True)
class ValueEntry:
    """A small Python value stored inline (NaN and infinities survive)."""

    type: ValueType
    value: Any


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """An inner node: a container or a trackable object, with its children's segments.

    ``adapter`` names how a live object produces and accepts this structure as a whole
    (``state_dict`` objects, random-number generators); ``None`` for plain containers
    and trackables, whose children are matched one by one.
    """

    type: NodeType
    children: tuple[str, ...]
    adapter: str | None = None


Entry = Union[ArrayEntry, ValueEntry, NodeEntry]  # noqa: UP007 - runtime alias on 3.10


@dataclass(frozen=True, slots=True)
class DataObject:
    """One data object of the checkpoint: its key (relative to the directory) and size."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class CheckpointIndex:
    """A whole parsed index. ``entries`` maps key paths to entries; ``""`` is the root.

    ``references`` (version 2) names the other checkpoints whose data objects this index
    also names: an incremental save reuses unchanged bytes where they already are.
    """

    name: str
    entries: Mapping[str, Entry]
    objects: tuple[DataObject, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    references: tuple[str, ...] = ()
    #: What torch.distributed.checkpoint's ``Metadata`` carries beyond the entries (tensor
    #: properties, planner data, ...), as plain JSON; ``None`` for other checkpoints.
    #: Only ``cloudckpt.dcp`` interprets it (and validates it when it does).
    dcp: Mapping[str, Any] | None = None

    def owned_objects(self) -> tuple[DataObject, ...]:
        """The data objects this checkpoint's own write made (not the ones it references)."""
        return tuple(o for o in self.objects if object_checkpoint(o.name) == self.name)

    def bytes_by_checkpoint(self) -> dict[str, int]:
        """Array bytes per checkpoint whose objects hold them: this one's new bytes under its
        own name, the bytes an incremental save reused under the checkpoints that wrote them."""
        out: dict[str, int] = {}
        for entry in self.entries.values():
            if isinstance(entry, ArrayEntry):
                for c in entry.chunks:
                    owner = object_checkpoint(self.objects[c.object].name) or self.name
                    out[owner] = out.get(owner, 0) + c.length
        return out


def object_checkpoint(object_name: str) -> str | None:
    """The checkpoint a data object belongs to (the prefix its write gave it), or ``None`` for a
    key that is no data object (a spread one must sit in its own checkpoint's ``.d/`` directory)."""
    match = DATA_OBJECT.fullmatch(object_name)
    if match is None or match["dir"] not in (None, match["name"]):
        return None
    return match["name"]


def renamed_object(object_name: str, name: str) -> str:
    """A data object's key for a copy of its checkpoint under ``name`` (its write-unique suffix kept)."""
    owner = object_checkpoint(object_name)
    if owner is None:
        raise ValueError(f"{object_name!r} is not a data object")
    base = name + object_name.rsplit("/", 1)[-1][len(owner):]
    return _spread_key(name, base) if "/" in object_name else base


def referenced_checkpoints(name: str, objects: Sequence[DataObject]) -> tuple[str, ...]:
    """The other checkpoints whose objects ``objects`` include, sorted (an index's ``references``)."""
    return tuple(sorted({c for o in objects if (c := object_checkpoint(o.name)) is not None and c != name}))


# ---------------------------------------------------------------------------- encode
def encode_value(value: object) -> ValueEntry:
    """A JSON leaf for a Python scalar or string; ``TypeError`` for anything else."""
    if value is None:
        return ValueEntry("none", None)
    if isinstance(value, bool):
        return ValueEntry("bool", value)
    if isinstance(value, int):
        return ValueEntry("int", int(value))
    if isinstance(value, float):
        return ValueEntry("float", float(value))
    if isinstance(value, str):
        return ValueEntry("str", value)
    raise TypeError(f"{type(value).__name__} is not a JSON scalar")


def _float_to_json(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _chunk_to_json(c: Chunk) -> dict[str, Any]:
    out: dict[str, Any] = {"object": c.object, "offset": c.offset, "length": c.length, "crc32c": c.crc32c,
                           "start": list(c.start), "shape": list(c.shape)}
    if c.block_crc32c:
        packed = b"".join(crc.to_bytes(4, "big") for crc in c.block_crc32c)
        out["blocks"] = {"size": c.block_size, "crc32c": base64.b64encode(packed).decode("ascii")}
    if c.hash is not None:
        out["hash"] = c.hash
    return out


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    if isinstance(entry, ArrayEntry):
        array: dict[str, Any] = {"kind": "array", "dtype": entry.dtype, "shape": list(entry.shape),
                                 "pytype": entry.pytype}
        grid = entry.chunks if isinstance(entry.chunks, ChunkGrid) else as_grid(
            entry.shape, parse_dtype(entry.dtype).itemsize, entry.chunks)
        if grid is not None:
            array["grid"] = grid_to_json(grid)  # many chunks on a grid: the compact form (version 2)
        else:
            array["chunks"] = [_chunk_to_json(c) for c in entry.chunks]
        return array
    if isinstance(entry, ValueEntry):
        value = _float_to_json(entry.value) if entry.type == "float" else entry.value
        return {"kind": "value", "type": entry.type, "value": value}
    out: dict[str, Any] = {"kind": "node", "type": entry.type, "children": list(entry.children)}
    if entry.adapter is not None:
        out["adapter"] = entry.adapter
    return out


def encode_index(index: CheckpointIndex) -> bytes:
    """The index as UTF-8 JSON (strict JSON: no NaN literals)."""
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": index.name,
        "objects": [{"name": o.name, "size": o.size} for o in index.objects],
        "entries": {path: _entry_to_json(e) for path, e in index.entries.items()},
        "metadata": dict(index.metadata),
    }
    references = referenced_checkpoints(index.name, index.objects)
    if references:
        doc["references"] = list(references)
    if index.dcp is not None:
        doc["dcp"] = dict(index.dcp)
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- decode
class _Checker:
    """Type checks that raise ``CheckpointFormatError`` naming where in the index."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: The document's format version (fields a version lacks are unknown fields to it).
        self.version = FORMAT_VERSION

    def fail(self, where: str, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"malformed checkpoint index {self.url}: {where}: {problem}")

    def dict_(self, value: object, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        return value

    def list_(self, value: object, where: str, max_len: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {type(value).__name__}")
        if len(value) > max_len:
            raise self.fail(where, f"list of {len(value)} items exceeds {max_len}")
        return value

    def int_(self, value: object, where: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"expected an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.fail(where, f"{value} is outside [{lo}, {hi}]")
        return value

    def str_(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {type(value).__name__}")
        return value

    def keys(self, doc: dict[str, Any], where: str, required: set[str], optional: frozenset[str] = frozenset()) -> None:
        missing = required - doc.keys()
        extra = doc.keys() - required - optional
        problems = ([f"missing field(s) {sorted(missing)}"] if missing else []) + \
            ([f"unknown field(s) {sorted(extra)}"] if extra else [])
        if problems:  # both named: a newer writer's field usually stands where an older one's is missing
            raise self.fail(where, "; ".join(problems))


def decode_index(data: bytes, name: str, url: str) -> CheckpointIndex:
    """Parse and fully validate the index of checkpoint ``name``.

    Raises:
        CheckpointFormatError: the bytes are not an index this version understands, or
            describe something impossible (offsets past an object, chunks outside their
            array, data objects of another checkpoint, an inconsistent tree, ...).
    """
    check = _Checker(url)
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise check.fail("document", f"not valid UTF-8 JSON ({exc})") from None
    doc = check.dict_(doc, "document")
    if doc.get("format") != FORMAT_NAME:
        raise check.fail("format", f"expected {FORMAT_NAME!r}, got {doc.get('format')!r}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointVersionError(
            f"checkpoint index {url} has format version {version!r}; this cloudckpt reads versions "
            f"{', '.join(map(str, sorted(READABLE_VERSIONS)))} - upgrade cloudckpt to read it", version)
    check.version = version
    check.keys(doc, "document", {"format", "version", "name", "objects", "entries", "metadata"},
               frozenset({"references", "dcp"}) if version >= 2 else frozenset())
    if check.str_(doc["name"], "name") != name:
        raise check.fail("name", f"index is for checkpoint {doc['name']!r}, not {name!r}")
    references = _decode_references(check, doc.get("references", []), name)
    objects = _decode_objects(check, doc["objects"], name, references)
    raw_entries = check.dict_(doc["entries"], "entries")
    entries: dict[str, Entry] = {}
    for path, raw in raw_entries.items():
        entries[path] = _decode_entry(check, path, raw, objects)
    _check_tree(check, entries)
    metadata = check.dict_(doc["metadata"], "metadata")
    dcp = check.dict_(doc["dcp"], "dcp") if "dcp" in doc else None
    return CheckpointIndex(name=name, entries=entries, objects=objects, metadata=metadata, version=version,
                           references=references, dcp=dcp)


def _reject_constant(token: str) -> None:
    raise ValueError(f"non-standard JSON constant {token}")


def _decode_references(check: _Checker, raw: object, name: str) -> tuple[str, ...]:
    """Version 2: the other checkpoints (of the same directory) whose data objects this index names."""
    out = []
    for i, item in enumerate(check.list_(raw, "references", 1 << 16)):
        ref = check.str_(item, f"references[{i}]")
        if not _CHECKPOINT_NAME.fullmatch(ref) or ref in (".", "..") or ref == name:
            raise check.fail(f"references[{i}]", f"{ref!r} is not another checkpoint of this directory")
        out.append(ref)
    if len(set(out)) != len(out):
        raise check.fail("references", "duplicate checkpoint names")
    return tuple(out)


def _decode_objects(check: _Checker, raw: object, name: str, references: Sequence[str]) -> tuple[DataObject, ...]:
    """The data objects: of this checkpoint, or (version 2) of a checkpoint listed in ``references``.

    A name of any other form is refused, so an index can never make a reader read - or a
    manager delete - objects outside the checkpoints it declares, or outside its directory.
    """
    allowed = {name, *references}
    used: set[str] = set()
    objects = []
    seen: set[str] = set()
    for i, item in enumerate(check.list_(raw, "objects", 1 << 20)):
        where = f"objects[{i}]"
        obj = check.dict_(item, where)
        check.keys(obj, where, {"name", "size"})
        obj_name = check.str_(obj["name"], where + ".name")
        owner = object_checkpoint(obj_name)
        if owner not in allowed:
            also = f" or of the checkpoints it references {sorted(references)}" if references else ""
            raise check.fail(where, f"data object name {obj_name!r} is not a data object of {name!r}{also}")
        used.add(owner)
        if obj_name in seen:
            raise check.fail(where, f"duplicate data object {obj_name!r}")
        seen.add(obj_name)
        objects.append(DataObject(obj_name, check.int_(obj["size"], where + ".size")))
    unused = set(references) - used
    if unused:
        raise check.fail("references", f"{sorted(unused)} named but none of their objects is")
    return tuple(objects)


def _decode_entry(check: _Checker, path: str, raw: object, objects: Sequence[DataObject]) -> Entry:
    where = f"entries[{path!r}]" if len(path) <= 200 else f"entries[{path[:200]!r}...]"
    _check_path(check, path, where)
    doc = check.dict_(raw, where)
    kind = doc.get("kind")
    if kind == "array":
        if "grid" in doc and check.version >= 2:
            check.keys(doc, where, {"kind", "dtype", "shape", "pytype", "grid"})
        else:
            check.keys(doc, where, {"kind", "dtype", "shape", "pytype", "chunks"})
        return _decode_array(check, doc, where, objects)
    if kind == "value":
        check.keys(doc, where, {"kind", "type", "value"})
        return _decode_value(check, doc, where)
    if kind == "node":
        check.keys(doc, where, {"kind", "type", "children"}, frozenset({"adapter"}))
        node_type = doc["type"]
        if not isinstance(node_type, str) or node_type not in NODE_TYPES:
            raise check.fail(where, f"unknown node type {node_type!r}")
        children = check.list_(doc["children"], where + ".children", 1 << 24)
        for seg in children:
            check.str_(seg, where + ".children")
        if len(set(children)) != len(children):
            raise check.fail(where, "duplicate children")
        adapter = doc.get("adapter")
        if adapter is not None and (not isinstance(adapter, str) or adapter not in ADAPTERS):
            raise check.fail(where, f"unknown adapter {adapter!r}")
        return NodeEntry(cast(NodeType, node_type), tuple(children), adapter)
    raise check.fail(where, f"unknown entry kind {kind!r}")


def _check_path(check: _Checker, path: str, where: str) -> None:
    if path == "":
        return
    if len(path) > MAX_KEY_PATH:
        raise check.fail(where, f"key path of {len(path)} characters is longer than {MAX_KEY_PATH}")
    for seg in path.split("/"):
        try:
            decode_segment(seg)
        except CheckpointFormatError as exc:
            raise check.fail(where, str(exc)) from None


def _decode_shape(check: _Checker, raw: object, where: str) -> tuple[int, ...]:
    dims = check.list_(raw, where, MAX_NDIM)
    return tuple(check.int_(d, where) for d in dims)


def _decode_array(check: _Checker, doc: dict[str, Any], where: str, objects: Sequence[DataObject]) -> ArrayEntry:
    try:
        dtype = parse_dtype(doc["dtype"])
    except CheckpointFormatError as exc:
        raise check.fail(where, str(exc)) from None
    shape = _decode_shape(check, doc["shape"], where + ".shape")
    size = math.prod(shape)
    if size * dtype.itemsize > MAX_BYTES:
        raise check.fail(where, f"array of shape {shape} is absurdly large")
    pytype = doc["pytype"]
    if not isinstance(pytype, str) or pytype not in ARRAY_PYTYPES:
        raise check.fail(where, f"unknown pytype {pytype!r}")
    if pytype == "numpy_scalar" and shape != ():
        raise check.fail(where, "a numpy scalar must have shape ()")
    if pytype == "bytes" and check.version < 2:
        raise check.fail(where, "pytype 'bytes' needs format version 2")
    if pytype == "bytes" and (dtype != np.uint8 or len(shape) != 1):
        raise check.fail(where, "a bytes entry must be a 1-D uint8 array")
    if "grid" in doc:  # disjoint and covering by construction: the columns are checked, not pairs of boxes
        if not shape or 0 in shape:
            raise check.fail(where, "a grid needs an array with at least one element")
        grid = grid_from_json(doc["grid"], shape, dtype.itemsize, [o.size for o in objects],
                              lambda problem: check.fail(where + ".grid", problem))
        return ArrayEntry(dtype_name(dtype), shape, cast(ArrayPyType, pytype), grid)
    raw_chunks = check.list_(doc["chunks"], where + ".chunks", MAX_CHUNKS_PER_ARRAY)
    if not raw_chunks:
        raise check.fail(where, "an array needs at least one chunk")
    chunks = tuple(_decode_chunk(check, c, f"{where}.chunks[{i}]", shape, dtype.itemsize, objects)
                   for i, c in enumerate(raw_chunks))
    if sum(math.prod(c.shape) for c in chunks) != size:
        raise check.fail(where, "chunks do not cover the array exactly")
    if len(chunks) > 1:
        problem = partition_problem(shape, [(c.start, c.shape) for c in chunks])
        if problem is not None:
            raise check.fail(where, problem)
    return ArrayEntry(dtype_name(dtype), shape, cast(ArrayPyType, pytype), chunks)


def _decode_chunk(check: _Checker, raw: object, where: str, shape: tuple[int, ...], itemsize: int,
                  objects: Sequence[DataObject]) -> Chunk:
    doc = check.dict_(raw, where)
    check.keys(doc, where, {"object", "offset", "length", "crc32c", "start", "shape"},
               frozenset({"blocks", "hash"}) if check.version >= 2 else frozenset({"blocks"}))
    obj = check.int_(doc["object"], where + ".object", 0, max(len(objects) - 1, -1))
    offset = check.int_(doc["offset"], where + ".offset")
    length = check.int_(doc["length"], where + ".length")
    crc = check.int_(doc["crc32c"], where + ".crc32c", 0, 2**32 - 1)
    start = _decode_shape(check, doc["start"], where + ".start")
    cshape = _decode_shape(check, doc["shape"], where + ".shape")
    if len(start) != len(shape) or len(cshape) != len(shape):
        raise check.fail(where, "chunk rank differs from the array's")
    if any(s + n > dim for s, n, dim in zip(start, cshape, shape, strict=True)):
        raise check.fail(where, f"chunk at {start} of shape {cshape} lies outside the array {shape}")
    if length != math.prod(cshape) * itemsize:
        raise check.fail(where, f"length {length} does not match chunk shape {cshape}")
    if offset + length > objects[obj].size:
        raise check.fail(where, f"bytes [{offset}, {offset + length}) run past the end of "
                                f"{objects[obj].name} ({objects[obj].size} bytes)")
    block_size, block_crcs = _decode_blocks(check, doc.get("blocks"), where + ".blocks", length)
    content_hash = doc.get("hash")
    if content_hash is not None and not (isinstance(content_hash, str) and CONTENT_HASH.fullmatch(content_hash)):
        raise check.fail(where + ".hash", f"expected 'xxh3_128:' and 32 hex digits, got {content_hash!r}")
    return Chunk(obj, offset, length, crc, start, cshape, block_size, block_crcs, content_hash)


def _decode_blocks(check: _Checker, raw: object, where: str, length: int) -> tuple[int, tuple[int, ...]]:
    """A chunk's per-block CRC32Cs: ``{"size": bytes, "crc32c": base64 of big-endian uint32s}``."""
    if raw is None:
        return 0, ()
    doc = check.dict_(raw, where)
    check.keys(doc, where, {"size", "crc32c"})
    size = check.int_(doc["size"], where + ".size", 4096, 2**30)
    if size % 16:
        raise check.fail(where, f"block size {size} is not a multiple of 16")
    count = -(-length // size)
    try:
        packed = base64.b64decode(check.str_(doc["crc32c"], where + ".crc32c"), validate=True)
    except (ValueError, TypeError):
        raise check.fail(where, "crc32c is not base64") from None
    if len(packed) != 4 * count:
        raise check.fail(where, f"{len(packed) // 4} block checksums for {count} blocks of {size} bytes")
    return size, tuple(int.from_bytes(packed[i:i + 4], "big") for i in range(0, len(packed), 4))


def _decode_value(check: _Checker, doc: dict[str, Any], where: str) -> ValueEntry:
    vtype, value = doc["type"], doc["value"]
    if vtype == "none" and value is None:
        return ValueEntry("none", None)
    if vtype == "bool" and isinstance(value, bool):
        return ValueEntry("bool", value)
    if vtype == "int" and isinstance(value, int) and not isinstance(value, bool):
        return ValueEntry("int", value)
    if vtype == "str" and isinstance(value, str):
        return ValueEntry("str", value)
    if vtype == "float":
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            return ValueEntry("float", float(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return ValueEntry("float", float(value))
    raise check.fail(where, f"value {value!r} does not match type {vtype!r}")


def _check_tree(check: _Checker, entries: Mapping[str, Entry]) -> None:
    """Every entry hangs under the root through nodes that list it, and vice versa.

    One pass over the nodes' children and one over the entries, with set lookups: linear
    in the index (a node with 10^5 children must not cost 10^10 comparisons). A child
    segment never holds '/', so each listing names one entry whose parent is that node.
    """
    root = entries.get("")
    if not isinstance(root, NodeEntry) or root.type != "object":
        raise check.fail("entries", "the root entry '' must be an object node")
    listed: set[str] = set()
    for path, entry in entries.items():
        if not isinstance(entry, NodeEntry):
            continue
        for seg in entry.children:
            if "/" in seg or not seg:
                raise check.fail(f"entries[{path!r}]", f"child segment {seg!r} is empty or holds '/'")
            child = join_path(path, seg)
            if child not in entries:
                raise check.fail(f"entries[{path!r}]", f"child {seg!r} has no entry")
            listed.add(child)
        if entry.type in ("list", "tuple"):
            for seg in entry.children:
                if not _INDEX_RE.fullmatch(seg):
                    raise check.fail(f"entries[{path!r}]", f"list item segment {seg!r} is not an index")
            if {int(s) for s in entry.children} != set(range(len(entry.children))):
                raise check.fail(f"entries[{path!r}]", "list items are not 0..n-1")
    if len(listed) != len(entries) - 1:
        for path in entries:
            if path and path not in listed:
                raise check.fail(f"entries[{path!r}]", "not listed by a parent node")
