"""Which data objects the committed checkpoints of a directory name: the one rule every deletion obeys.

Incremental saves (format version 2) make an index name data objects of earlier
checkpoints, so "delete a checkpoint's objects" is no longer safe on its own: an object may
be deleted only when **no committed index in the directory names it**. Every deletion path
- evicting a checkpoint, finishing an eviction after a crash, replacing a checkpoint,
undoing a fenced writer's save, cleaning up crashed saves, ``cloudckpt gc`` - asks this
module first.

Why scan every index rather than trust bookkeeping: the indexes are the only record that
is never wrong (a state file can be stale, garbled or another writer's), and a directory
holds few of them (``max_to_keep`` + preserved ones).

Indexes this reader cannot use: one of a *newer format version* may be valid and name any
object, so while one exists no data object is deleted at all. A *malformed* one (torn,
foreign, a TensorFlow ``.index`` table) cannot be restored from anyway; it protects the
data objects of its own checkpoint name, as it always did, and is warned about.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cloudckpt.errors import CheckpointFormatError, CheckpointVersionError, NotFoundError
from cloudckpt.format.entries import CheckpointIndex
from cloudckpt.format.naming import INDEX_SUFFIX, object_checkpoint
from cloudckpt.format.sniff import ForeignCheckpoint, load_any_index
from cloudckpt.storage import Storage

log = logging.getLogger("cloudckpt.format.references")

#: Indexes read in parallel while scanning a directory.
_SCAN_THREADS = 8


@dataclass(frozen=True, slots=True)
class DirectoryReferences:
    """What the directory's committed indexes name, as of one scan.

    Attributes:
        named: every data object some readable committed index names.
        unreadable: checkpoints whose index is malformed (it protects their own objects).
        newer: checkpoints whose index is of a format version this reader does not know.
        indexes: the readable indexes, by checkpoint name.
    """

    named: frozenset[str]
    unreadable: frozenset[str]
    newer: tuple[str, ...]
    indexes: dict[str, CheckpointIndex]

    def protects(self, object_name: str) -> bool:
        """Whether a committed index names (or may name) ``object_name``."""
        return bool(self.newer) or object_name in self.named or object_checkpoint(object_name) in self.unreadable

    def deletable(self, candidates: Collection[str]) -> list[str]:
        """The candidates no committed index names (or may name)."""
        return sorted(c for c in set(candidates) if not self.protects(c))


def index_names(storage: Storage) -> list[str]:
    """Checkpoint names with an index directly in ``storage``'s directory (one LIST)."""
    return [m.key[:-len(INDEX_SUFFIX)] for m in storage.list("") if "/" not in m.key and m.key.endswith(INDEX_SUFFIX)]


def scan(storage: Storage, names: Sequence[str] | None = None) -> DirectoryReferences:
    """Read every committed index of the directory (or of ``names``) and collect what they name."""
    names = index_names(storage) if names is None else list(names)

    def load(name: str) -> CheckpointIndex | ForeignCheckpoint | CheckpointFormatError | None:
        try:
            return load_any_index(storage, name)  # a TensorFlow checkpoint names its shards
        except NotFoundError:
            return None  # deleted since the listing
        except CheckpointFormatError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(_SCAN_THREADS, len(names)))) as pool:
        loaded = list(pool.map(load, names))
    named: set[str] = set()
    unreadable: set[str] = set()
    newer: list[str] = []
    indexes: dict[str, CheckpointIndex] = {}
    for name, found in zip(names, loaded, strict=True):
        if isinstance(found, CheckpointVersionError):
            log.warning("%s: no data object is deleted while it exists", found)
            newer.append(name)
        elif isinstance(found, CheckpointFormatError):
            log.warning("keeping every data object of %s: its index is unreadable (%s)", storage.url_for(name), found)
            unreadable.add(name)
        elif isinstance(found, ForeignCheckpoint):
            named.update(found.objects)
        elif found is not None:
            indexes[name] = found
            named.update(o.name for o in found.objects)
    return DirectoryReferences(frozenset(named), frozenset(unreadable), tuple(newer), indexes)


def listed_sizes(storage: Storage, names: Iterable[str]) -> dict[str, int]:
    """The size of each of the data objects ``names`` that exists, by listing (absent: not in the result).

    Why a listing and not a HEAD each: one LIST per checkpoint owning some of them (its
    prefix ``<checkpoint>.``, which also holds its spread objects), and a LIST returns up to
    1,000 objects per request, where a HEAD per object would cost one request each.
    """
    wanted = set(names)
    prefixes = {owner + "." if (owner := object_checkpoint(name)) is not None else name for name in wanted}
    found: dict[str, int] = {}
    for prefix in sorted(prefixes):
        found.update((m.key, m.size) for m in storage.list(prefix) if m.key in wanted)
    return found


def delete_unreferenced(storage: Storage, candidates: Collection[str]) -> list[str]:
    """Delete those of ``candidates`` that no committed index names (after a fresh scan); return them."""
    if not candidates:
        return []
    doomed = scan(storage).deletable(candidates)
    kept = len(candidates) - len(doomed)
    if kept:
        log.info("keeping %d data object(s) of %s that committed checkpoints still name", kept, storage.url)
    storage.delete(doomed)
    return doomed
