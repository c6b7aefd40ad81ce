"""What an Orbax checkpoint directory holds, read from its JSON metadata alone (no tensorstore).

Orbax 0.12's ``Checkpointer`` (``StandardCheckpointer``, ``PyTreeCheckpointer``) and each step of
its ``CheckpointManager`` write a directory whose ``_CHECKPOINT_METADATA`` (the marker this
package registers) names the handler of the item(s) in it:

- a single pytree: ``_METADATA`` (the tree: one entry per leaf, its key path with each key's
  kind - sequence index or dict key - and its value type), ``manifest.ocdbt`` + ``d/`` +
  ``ocdbt.process_N/`` (the arrays, one zarr array per leaf named by its keys joined with
  ``.``, zarr v2 by default, zarr v3 with ``use_zarr3``), ``_strings.json`` (string leaves);
- a ``CheckpointManager`` step with ``Composite`` items: ``_CHECKPOINT_METADATA``'s
  ``item_handlers`` maps item names to handlers, and each pytree item is such a directory
  ``<step>/<item>/`` (its leaves get ``<item>/`` in front of their key paths). Items of other
  handlers (JSON, ...) are left out and named in :attr:`OrbaxLayout.skipped`.

Everything here is untrusted: each JSON object is HEADed and refused above its size limit
before it is fetched, and every field is type-checked; errors name the object's URL.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cloudckpt.errors import CheckpointFormatError, NotFoundError
from cloudckpt.format.keypaths import encode_segment, join_path
from cloudckpt.storage import ByteRange, Storage

#: The object whose presence says "an Orbax checkpoint" (written by every Orbax Checkpointer).
MARKER = "_CHECKPOINT_METADATA"
TREE_METADATA = "_METADATA"
STRINGS = "_strings.json"
#: Largest metadata object fetched (a real ``_METADATA`` is ~250 bytes per leaf).
MAX_METADATA_BYTES = 64 * 1024 * 1024
MAX_LEAVES = 1 << 20
MAX_DEPTH = 256
#: Handlers whose items are pytrees this package reads (Orbax's class paths end in these names).
PYTREE_HANDLERS = ("StandardCheckpointHandler", "PyTreeCheckpointHandler")
_SEQUENCE, _DICT = 1, 2
ARRAY_TYPES = frozenset({"jax.Array", "np.ndarray", "scalar"})
EMPTY_TYPES = frozenset({"None", "Dict", "List", "Tuple", "NamedTuple"})
_ITEM_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


@dataclass(frozen=True, slots=True)
class OrbaxLeaf:
    """One leaf of the checkpoint.

    Attributes:
        path: its cloudckpt key path (``state/params/dense/kernel``).
        item: the directory holding it, relative to the checkpoint (``""`` or ``state``).
        param: Orbax's name for it in that directory (``params.dense.kernel``): the zarr array's
            key prefix in OCDBT, or the key in ``_strings.json``.
        kind: ``"array"`` (a zarr array in OCDBT; ``scalar`` leaves are 0-d ones), ``"string"``.
        value_type: Orbax's value type (``jax.Array``, ``np.ndarray``, ``scalar``, ``string``).
    """

    path: str
    item: str
    param: str
    kind: str
    value_type: str


@dataclass(frozen=True, slots=True)
class PyTreeItem:
    """One pytree directory of the checkpoint and how its arrays are stored.

    ``all_chunks_stored``: Orbax's ``store_array_data_equal_to_fill_value`` - every chunk was written,
    even one equal to the fill value, so a missing chunk is damage (without it, a missing chunk
    legitimately means "all fill value").
    """

    item: str
    use_ocdbt: bool
    use_zarr3: bool
    all_chunks_stored: bool = False


@dataclass(frozen=True, slots=True)
class OrbaxLayout:
    """The leaves and pytree items of one Orbax checkpoint, and the items left out (with why)."""

    leaves: tuple[OrbaxLeaf, ...]
    items: tuple[PyTreeItem, ...]
    skipped: tuple[str, ...]


def read_json(storage: Storage, key: str) -> Any:
    """The JSON value of object ``key``, refused by size before a byte is fetched.

    Raises:
        NotFoundError: no such object.
        CheckpointFormatError: too large, not UTF-8 JSON.
    """
    url = storage.url_for(key)
    size = storage.head(key).size
    if size > MAX_METADATA_BYTES:
        raise CheckpointFormatError(f"{url} is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit for Orbax "
                                    "metadata; refusing to read it", url)
    data = storage.get(key, ByteRange.bounded(0, size)) if size else b""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointFormatError(
            f"{url} is not JSON ({exc}): not an Orbax checkpoint, or a damaged one", url) from None


def _field(obj: Any, name: str, kind: type | tuple[type, ...], url: str) -> Any:
    if not isinstance(obj, dict) or not isinstance(obj.get(name), kind):
        raise CheckpointFormatError(f"{url}: {name!r} is missing or not a {kind}", url)
    return obj[name]


def _leaf(item: str, entry: Any, url: str) -> OrbaxLeaf | None:
    """One ``tree_metadata`` entry as a leaf (``None`` for empty containers and ``None`` leaves)."""
    keys = _field(entry, "key_metadata", list, url)
    value = _field(entry, "value_metadata", dict, url)
    value_type = _field(value, "value_type", str, url)
    if not 0 < len(keys) <= MAX_DEPTH:
        raise CheckpointFormatError(f"{url}: a leaf with {len(keys)} keys (1 to {MAX_DEPTH} allowed)", url)
    segments, names = [], []
    for key in keys:
        text = _field(key, "key", str, url)
        if _field(key, "key_type", int, url) == _SEQUENCE:
            if not re.fullmatch(r"0|[1-9][0-9]{0,11}", text):
                raise CheckpointFormatError(f"{url}: sequence index {text!r} is not a decimal index", url)
            segments.append(text)
        else:
            segments.append(encode_segment(text))
        names.append(text)
    path = "/".join(segments)
    if item:
        path = join_path(encode_segment(item), path)
    if value_type in EMPTY_TYPES:
        return None
    if value_type not in ARRAY_TYPES and value_type != "string":
        raise CheckpointFormatError(
            f"{url}: leaf {path!r} has value type {value_type!r}, which only its own Orbax TypeHandler reads "
            f"(cloudckpt reads {sorted(ARRAY_TYPES | {'string'})})", url)
    return OrbaxLeaf(path, item, ".".join(names), "string" if value_type == "string" else "array", value_type)


def read_tree(storage: Storage, directory: str, item: str) -> tuple[PyTreeItem, list[OrbaxLeaf]]:
    """The leaves of the pytree in ``<directory>/<item>`` (its ``_METADATA``)."""
    where = f"{directory}/{item}" if item else directory
    key = f"{where}/{TREE_METADATA}"
    url = storage.url_for(key)
    meta = read_json(storage, key)
    tree = _field(meta, "tree_metadata", dict, url)
    if len(tree) > MAX_LEAVES:
        raise CheckpointFormatError(f"{url}: {len(tree)} leaves, over the limit of {MAX_LEAVES}", url)
    flags = [meta.get("use_ocdbt", True), meta.get("use_zarr3", False),
             meta.get("store_array_data_equal_to_fill_value", False)]
    if not all(isinstance(flag, bool) for flag in flags):
        raise CheckpointFormatError(f"{url}: use_ocdbt / use_zarr3 / store_array_data_equal_to_fill_value are "
                                    "not booleans", url)
    leaves = [leaf for entry in tree.values() if (leaf := _leaf(item, entry, url)) is not None]
    return PyTreeItem(item, *flags), leaves


def read_layout(storage: Storage, directory: str) -> OrbaxLayout:
    """What checkpoint ``directory`` holds (its ``_CHECKPOINT_METADATA``, then each pytree's ``_METADATA``).

    Raises:
        CheckpointFormatError: malformed metadata, a duplicate key path, or no pytree in it.
    """
    url = storage.url_for(f"{directory}/{MARKER}")
    step = read_json(storage, f"{directory}/{MARKER}")
    handlers = step.get("item_handlers") if isinstance(step, dict) else None
    items: list[str] = []
    skipped: list[str] = []
    if isinstance(handlers, dict):
        for name, handler in sorted(handlers.items()):
            if not isinstance(name, str) or not _ITEM_NAME.fullmatch(name) or name in (".", ".."):
                raise CheckpointFormatError(f"{url}: item name {name!r} is not a plain directory name", url)
            if isinstance(handler, str) and handler.endswith(PYTREE_HANDLERS):
                items.append(name)
            else:
                skipped.append(f"{name} ({handler})")
    else:
        items.append("")  # a Checkpointer's own directory: the pytree is right here
    trees: list[PyTreeItem] = []
    leaves: list[OrbaxLeaf] = []
    for item in items:
        try:
            tree, found = read_tree(storage, directory, item)
        except NotFoundError:
            if item:
                skipped.append(f"{item} (no {TREE_METADATA})")
                continue
            raise CheckpointFormatError(
                f"{storage.url_for(directory)} is an Orbax checkpoint without a pytree ({TREE_METADATA}); "
                "cloudckpt reads Orbax pytree checkpoints only", url) from None
        trees.append(tree)
        leaves.extend(found)
    if not trees:
        raise CheckpointFormatError(
            f"{storage.url_for(directory)} is an Orbax checkpoint with no pytree item cloudckpt reads "
            f"(items: {', '.join(skipped) or 'none'})", url)
    seen: set[str] = set()
    for leaf in leaves:
        if leaf.path in seen:
            raise CheckpointFormatError(f"{url}: key path {leaf.path!r} appears twice", url)
        seen.add(leaf.path)
    return OrbaxLayout(tuple(leaves), tuple(trees), tuple(skipped))
