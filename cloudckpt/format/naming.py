"""Object names: a checkpoint's index and data objects, spread directories, and which
checkpoint a data object belongs to (docs/format.md, "Objects").
"""

from __future__ import annotations

import hashlib
import re

from cloudckpt.storage.keys import SPREAD_INFIX as SPREAD_INFIX  # re-exported: part of the naming scheme

INDEX_SUFFIX = ".index"
DATA_INFIX = ".data-"


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
CHECKPOINT_NAME = re.compile(r"[^/\\\x00-\x1f]{1,512}")

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
