"""Decoding and validating an index: JSON bytes from a bucket others may write to, to a
``CheckpointIndex``, or ``CheckpointFormatError`` naming where it is wrong.

Why everything here is validated strictly: an index is read from a bucket other people
may write to. A hostile or truncated index must end in ``CheckpointFormatError`` - never
an ``IndexError`` deep in the reader, a huge allocation, a read outside the checkpoint's
own objects, or (since nothing is pickled) code execution. The checks follow the
document's shape, one function per part; they are one job, hence one ~320-line module.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from cloudckpt.errors import CheckpointFormatError, CheckpointVersionError
from cloudckpt.format.chunks import Chunk, grid_from_json, unpack_block_crcs
from cloudckpt.format.dtypes import dtype_name, parse_dtype
from cloudckpt.format.entries import (
    ADAPTERS,
    ARRAY_PYTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_BYTES,
    MAX_CHUNKS_PER_ARRAY,
    MAX_KEY_PATH,
    MAX_NDIM,
    NODE_TYPES,
    READABLE_VERSIONS,
    ArrayEntry,
    ArrayPyType,
    CheckpointIndex,
    DataObject,
    Entry,
    NodeEntry,
    NodeType,
    ValueEntry,
)
from cloudckpt.format.keypaths import INDEX_SEGMENT, decode_segment, join_path
from cloudckpt.format.naming import CHECKPOINT_NAME, CONTENT_HASH, object_checkpoint
from cloudckpt.format.partition import partition_problem


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
        if not CHECKPOINT_NAME.fullmatch(ref) or ref in (".", "..") or ref == name:
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
    """A chunk's per-block CRC32Cs: ``{"size": bytes, "crc32c": base64 of uint32s}``, big-endian in
    versions 1 and 2, little-endian from version 3 (the order a grid's always had)."""
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
    return size, unpack_block_crcs(packed, check.version)


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
                if not INDEX_SEGMENT.fullmatch(seg):
                    raise check.fail(f"entries[{path!r}]", f"list item segment {seg!r} is not an index")
            if {int(s) for s in entry.children} != set(range(len(entry.children))):
                raise check.fail(f"entries[{path!r}]", "list items are not 0..n-1")
    if len(listed) != len(entries) - 1:
        for path in entries:
            if path and path not in listed:
                raise check.fail(f"entries[{path!r}]", "not listed by a parent node")
