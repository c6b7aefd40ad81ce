"""An Orbax checkpoint behind ``cloudckpt.CheckpointReader``'s methods, its arrays read by tensorstore.

Names are cloudckpt key paths built from Orbax's own tree metadata (``params/dense/kernel``;
a ``CheckpointManager`` step's items in front: ``state/params/dense/kernel``); a name that is
an inner node (``params``) reads its subtree as nested dicts. Values come back as numpy
arrays (bfloat16 and the other ml_dtypes as such), a 0-d array (Orbax's ``scalar`` leaves)
as a numpy scalar, a string leaf as ``str`` - as ``CheckpointReader`` returns a
TensorFlow checkpoint's values. Read, never written; ``restore`` into live objects is not
offered (read values, or ``cloudckpt cp`` the checkpoint into cloudckpt's format).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from cloudckpt.errors import CheckpointFormatError, CloudCkptError, StorageError
from cloudckpt.format.keypaths import decode_segment
from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat
from cloudckpt.orbax.arrays import (
    ArrayMeta,
    check_chunks_stored,
    metadata_key,
    needs_chunk_check,
    parse_metadata,
)
from cloudckpt.orbax.kvstore import kvstore_spec, tensorstore
from cloudckpt.orbax.layout import STRINGS, OrbaxLayout, OrbaxLeaf, PyTreeItem, read_json, read_layout
from cloudckpt.storage import Storage

#: Cache for OCDBT's manifest and B-tree nodes, shared by every array of one checkpoint.
_OCDBT_CACHE_BYTES = 64 * 1024 * 1024
#: tensorstore's retries of a failing request (its default: 32, minutes against an unreachable endpoint).
_RETRIES = {"max_retries": 6, "initial_delay": "0.2s", "max_delay": "4s"}


#: tensorstore status codes that mean "the store failed" (else the data is at fault).
_STORE_FAILURES = ("UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED",
                   "RESOURCE_EXHAUSTED", "CANCELLED")


def _failed(exc: ValueError, what: str, url: str) -> CloudCkptError:
    """A tensorstore error (a ValueError carrying its status) as cloudckpt's: the store's, or the data's."""
    text = str(exc)
    if text.startswith(_STORE_FAILURES):
        return StorageError(f"{what}: {text}", url)
    return CheckpointFormatError(f"{what}: {text}", url)


class OrbaxReader:
    """The read-only methods of ``CheckpointReader`` over one Orbax checkpoint directory."""

    def __init__(self, storage: Storage, directory: str, layout: OrbaxLayout) -> None:
        self.storage = storage
        self.directory = directory
        self.url = storage.url_for(directory)
        self.layout = layout
        self._ts = tensorstore()
        self._context = self._ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": _OCDBT_CACHE_BYTES},
                                          "cache_pool": {"total_bytes_limit": 0},
                                          "s3_request_retries": _RETRIES, "gcs_request_retries": _RETRIES})
        self._items = {item.item: item for item in layout.items}
        self._leaves = {leaf.path: leaf for leaf in layout.leaves}
        self._metas: dict[str, ArrayMeta] | None = None
        self._strings: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ where things are
    def _kvstore(self, item: PyTreeItem, param: str) -> dict[str, Any]:
        """The kvstore spec of one array's key prefix ``<param>/``."""
        where = f"{self.directory}/{item.item}" if item.item else self.directory
        base = kvstore_spec(self.storage, where)
        if item.use_ocdbt:
            return {"driver": "ocdbt", "base": base, "path": f"{param}/", "cache_pool": "cache_pool#ocdbt"}
        return {**base, "path": f"{base['path']}{param}/"}

    def _where(self, leaf: OrbaxLeaf) -> str:
        return f"{leaf.path!r} of Orbax checkpoint {self.url}"

    def array_metas(self) -> dict[str, ArrayMeta]:
        """Every array leaf's validated zarr metadata (read once, all concurrently)."""
        with self._lock:
            if self._metas is not None:
                return self._metas
            pending = []
            for leaf in self._leaves.values():
                if leaf.kind != "array":
                    continue
                item = self._items[leaf.item]
                try:
                    store = self._ts.KvStore.open(self._kvstore(item, leaf.param), context=self._context).result()
                    read = store.read(metadata_key(item.use_zarr3))
                except ValueError as exc:
                    raise _failed(exc, f"cannot open {self._where(leaf)}", self.url) from exc
                pending.append((leaf, item, read))
            metas: dict[str, ArrayMeta] = {}
            for leaf, item, read in pending:
                try:
                    result = read.result()
                except ValueError as exc:
                    raise _failed(exc, f"cannot read the metadata of {self._where(leaf)}", self.url) from exc
                if result.state != "value":
                    raise CheckpointFormatError(f"{self._where(leaf)} has no {metadata_key(item.use_zarr3)}: "
                                                "damaged, or not written by Orbax", self.url)
                metas[leaf.path] = parse_metadata(bytes(result.value), item.use_zarr3, self._where(leaf))
            self._metas = metas
            return metas

    # ------------------------------------------------------------------ values
    def _string(self, leaf: OrbaxLeaf) -> str:
        with self._lock:
            table = self._strings.get(leaf.item)
            if table is None:
                where = f"{self.directory}/{leaf.item}" if leaf.item else self.directory
                loaded = read_json(self.storage, f"{where}/{STRINGS}")
                if not isinstance(loaded, dict):
                    raise CheckpointFormatError(f"{self.storage.url_for(f'{where}/{STRINGS}')} is not a JSON object")
                table = self._strings[leaf.item] = loaded
        value = table.get(leaf.param)
        if not isinstance(value, str):
            raise CheckpointFormatError(f"{self._where(leaf)}: no string for it in {STRINGS}", self.url)
        return value

    def _array(self, leaf: OrbaxLeaf) -> Any:
        meta = self.array_metas()[leaf.path]
        item = self._items[leaf.item]
        kvstore = self._kvstore(item, leaf.param)
        try:
            if needs_chunk_check(meta, item.all_chunks_stored):
                listing = self._ts.KvStore.open(kvstore, context=self._context).result().list().result()
                check_chunks_stored(meta, list(listing), item.use_zarr3, self._where(leaf))
            store = self._ts.open({"driver": "zarr3" if item.use_zarr3 else "zarr", "kvstore": kvstore},
                                  open=True, read=True, context=self._context).result()
        except ValueError as exc:
            raise _failed(exc, f"cannot open {self._where(leaf)}", self.url) from exc
        if tuple(store.shape) != meta.shape or np.dtype(store.dtype.numpy_dtype) != meta.dtype:
            raise CheckpointFormatError(f"{self._where(leaf)}: tensorstore opened {store.dtype}{list(store.shape)}, "
                                        f"its metadata says {meta.dtype}{list(meta.shape)}", self.url)
        try:
            value = np.asarray(store.read().result())
        except ValueError as exc:
            raise _failed(exc, f"cannot read {self._where(leaf)}", self.url) from exc
        return value[()] if value.ndim == 0 else value

    def _value(self, leaf: OrbaxLeaf) -> Any:
        return self._string(leaf) if leaf.kind == "string" else self._array(leaf)

    # ------------------------------------------------------------------ CheckpointReader's methods
    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        metas = self.array_metas()
        return {path: list(metas[path].shape) if leaf.kind == "array" else [] for path, leaf in self._leaves.items()}

    def get_variable_to_dtype_map(self) -> dict[str, np.dtype[Any] | type]:
        metas = self.array_metas()
        return {path: metas[path].dtype if leaf.kind == "array" else str for path, leaf in self._leaves.items()}

    def has_tensor(self, name: str) -> bool:
        return name in self._leaves

    def get_tensor(self, name: str) -> Any:
        """One leaf's value (reading only its bytes), or the leaves under ``name`` as nested dicts."""
        leaf = self._leaves.get(name)
        if leaf is not None:
            return self._value(leaf)
        prefix = f"{name}/" if name else ""
        below = [leaf for path, leaf in self._leaves.items() if path.startswith(prefix)]
        if not below:
            raise KeyError(f"{name!r} is not in Orbax checkpoint {self.url}")
        tree: dict[Any, Any] = {}
        for leaf in below:
            node = tree
            *parents, last = leaf.path[len(prefix):].split("/")
            for segment in parents:
                node = node.setdefault(decode_segment(segment), {})
            node[decode_segment(last)] = self._value(leaf)
        return tree

    def restore(self, name: str, target: Any) -> None:
        raise NotImplementedError(
            f"restoring into objects from the Orbax checkpoint {self.url} is not supported; read values with "
            f"get_tensor({name!r}), or cloudckpt cp it into cloudckpt's format (docs/orbax-import.md)")


def open_orbax(storage: Storage, name: str) -> ForeignCheckpoint:
    """Checkpoint ``name`` (a directory with ``_CHECKPOINT_METADATA``) as the core handles a foreign one."""
    layout = read_layout(storage, name)
    reader = OrbaxReader(storage, name, layout)
    objects = frozenset(meta.key for meta in storage.list(f"{name}/"))
    return ForeignCheckpoint(IndexFormat.ORBAX, reader.url, objects, reader, reader)
