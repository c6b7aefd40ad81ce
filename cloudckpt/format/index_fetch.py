"""Fetching a checkpoint's index from storage: the one guarded way every layer reads one.

An index is JSON read whole into memory, from a bucket other people may write to. So it
is HEADed first and refused by its size before a byte is fetched (``MAX_INDEX_BYTES``),
then fetched as exactly that many bytes (an object replaced by a larger one between the
HEAD and the GET cannot make the read grow), then fully validated by ``format.decode_index``;
an index found replaced in between is read again (``read_decoded``).
Saving, restoring, deletion, leftovers cleanup and the CLI all go through here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TypeVar

from cloudckpt.errors import (
    BucketNotFoundError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    InvalidRangeError,
    NotFoundError,
    StorageError,
)
from cloudckpt.format.decode import decode_index
from cloudckpt.format.entries import FORMAT_VERSION, CheckpointIndex
from cloudckpt.format.naming import INDEX_SUFFIX, index_key
from cloudckpt.storage import ByteRange, ObjectMeta, Storage

log = logging.getLogger("cloudckpt.format")

T = TypeVar("T")

#: Largest index a reader will fetch. A real one is ~200 bytes per array chunk, so this
#: allows millions of chunks while refusing a multi-GB object that is not an index (or a
#: hostile one) before a byte is fetched.
MAX_INDEX_BYTES = 512 * 1024 * 1024

#: Times an index found replaced while it was read is read again before its error stands.
REPLACED_REREADS = 2


def head_index(storage: Storage, name: str) -> ObjectMeta | None:
    """The index object of checkpoint ``name`` as it is now, or ``None`` if absent: before a write.

    Its callers HEAD an index to then commit, replace or remove it (a save's commit is
    conditional on this answer), so this also starts what a conditional write needs
    (``Storage.prepare_conditional_writes``: S3's once-per-process probe) while the caller
    goes on (issue 27, first request). Reads HEAD through ``_head_index``, which does not.

    Raises:
        BucketNotFoundError: the bucket itself is missing (never "no checkpoint yet").
    """
    storage.prepare_conditional_writes()
    return _head_index(storage, name)


def _head_index(storage: Storage, name: str) -> ObjectMeta | None:
    """``head_index`` without the conditional-write warm-up: what a read needs."""
    try:
        return storage.head(index_key(name))
    except BucketNotFoundError:
        raise
    except NotFoundError:
        return None


def read_index_bytes(storage: Storage, name: str, meta: ObjectMeta | None = None) -> bytes | None:
    """The bytes of checkpoint ``name``'s index object (``None`` if absent), refused by size first.

    Shared by both formats an ``.index`` can hold (cloudckpt's JSON, TensorFlow's table): the
    caller tells them apart by content. ``meta`` is a HEAD of the index the caller already made.

    Raises:
        CheckpointFormatError: over ``MAX_INDEX_BYTES`` (not an index, or a hostile one).
        BucketNotFoundError: the bucket is missing.
    """
    key = index_key(name)
    url = storage.url_for(key)
    if meta is None:
        meta = _head_index(storage, name)
        if meta is None:
            return None
    if meta.size > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"{url} is {meta.size} bytes, over the {MAX_INDEX_BYTES}-byte limit for an "
                                    "index; refusing to read it (not a cloudckpt index?)")
    try:
        return storage.get(key, ByteRange.bounded(0, meta.size)) if meta.size else storage.get(key)
    except BucketNotFoundError:
        raise
    except NotFoundError:
        return None
    except InvalidRangeError:
        raise CheckpointFormatError(f"{url} shrank while it was being read (replaced by another writer?)") from None


def read_index(storage: Storage, name: str, meta: ObjectMeta | None = None) -> CheckpointIndex | None:
    """The validated index of checkpoint ``name``, or ``None`` if it has none.

    ``meta`` is a HEAD of the index the caller already made (saves one request).

    Raises:
        CheckpointFormatError: over ``MAX_INDEX_BYTES``, malformed, or of an unknown version.
        BucketNotFoundError: the bucket is missing.
    """
    url = storage.url_for(index_key(name))
    return read_decoded(storage, name, lambda data: decode_index(data, name, url), meta)


def read_decoded(storage: Storage, name: str, decode: Callable[[bytes], T], meta: ObjectMeta | None = None) -> T | None:
    """``decode`` of checkpoint ``name``'s index bytes (``None`` if it has none), read again if it was
    replaced while it was being read.

    Why: the HEAD sizes the GET, so an index another writer replaces in between (a manager
    overwriting ``last``, an async save committing) reads as the first bytes of a longer new one -
    malformed JSON - or runs short of a shorter one. Neither is damage. When reading or decoding
    fails, the index is HEADed again; if its version or size changed it is read again
    (``REPLACED_REREADS`` times at most), else the error stands. A good read costs nothing extra.
    """
    for attempt in range(REPLACED_REREADS + 1):
        if meta is None:
            meta = _head_index(storage, name)
            if meta is None:
                return None
        try:
            data = read_index_bytes(storage, name, meta)
            return None if data is None else decode(data)
        except CheckpointFormatError:
            now = _head_index(storage, name) if attempt < REPLACED_REREADS else meta
            if now is None or (now.version, now.size) == (meta.version, meta.size):
                raise
            log.info("%s was replaced while it was read; reading it again", storage.url_for(index_key(name)))
            meta = now
    raise AssertionError("unreachable: the last attempt returns or raises")


def newer_format(exc: BaseException) -> CheckpointVersionError | None:
    """``exc`` if it says an index is of a *newer* format (an integer version above ours), else ``None``.

    Why the distinction: such a checkpoint is valid for the cloudckpt that wrote it - not
    damaged - so a resume must stop (upgrade) rather than fall back past it, and nothing
    may replace or delete it. A version that is no integer, or one below every version we
    read, cannot come from any cloudckpt: that index is damaged like any malformed one.
    """
    if not isinstance(exc, CheckpointVersionError):
        return None
    version = exc.version
    newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
    return exc if newer else None


def index_not_found(storage: Storage, name: str) -> CheckpointNotFoundError:
    """The error for checkpoint ``name`` having no index (its message suggests ``<name>-N`` that exist)."""
    return CheckpointNotFoundError(_not_found_message(storage, name), storage.url_for(name), key=index_key(name))


def load_index(storage: Storage, name: str) -> CheckpointIndex:
    """The validated index of checkpoint ``name``, which must exist.

    Raises:
        CheckpointNotFoundError: no index (the checkpoint does not exist or is not
            committed); the message suggests ``<name>-N`` checkpoints that do exist.
        BucketNotFoundError: the bucket is missing.
        CheckpointFormatError: the index is malformed, too large, or of an unknown version.
    """
    index = read_index(storage, name)
    if index is None:
        raise index_not_found(storage, name)
    return index


def _not_found_message(storage: Storage, name: str) -> str:
    url = storage.url_for(name)
    message = f"no checkpoint at {url!r} (no {index_key(name)!r} object)"
    try:
        numbered = [m.key[:-len(INDEX_SUFFIX)] for m in storage.list(f"{name}-") if m.key.endswith(INDEX_SUFFIX)]
        inside = [m.key for m in storage.list(f"{name}/")[:1000] if m.key.endswith(INDEX_SUFFIX)]
    except (StorageError, OSError, ValueError):
        numbered, inside = [], []
    if inside:
        return (f"{message}. {url!r} is a directory holding {len(inside)} checkpoint index(es) "
                f"(e.g. {storage.url_for(inside[-1][:-len(INDEX_SUFFIX)])!r}): name a checkpoint in it, or list "
                "them with `cloudckpt ls`")
    numbered = [n for n in numbered if re.fullmatch(re.escape(name) + r"-\d+", n)]
    if numbered:
        newest = max(numbered, key=lambda n: int(n.rsplit("-", 1)[1]))
        message += (f". Checkpoint.save() appends '-N' to its prefix: did you mean "
                    f"{storage.url_for(newest)!r}? (found {len(numbered)} numbered checkpoint(s))")
    elif not re.search(r"-\d+$", name):
        message += ". Note that Checkpoint.save() writes '<prefix>-N', not '<prefix>'"
    return message
