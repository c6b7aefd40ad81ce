"""``remove_checkpoint``: delete one checkpoint of a directory by hand, as eviction would.

What ``cloudckpt rm`` runs. The steps are the manager's own, in its order:

1. take the checkpoint out of the state file (every list it appears in) and record it as
   ``deleting``, in one compare-and-swap write (``state_file.write_state``, re-read and
   retried when another writer replaced the file meanwhile: nothing of theirs is lost);
2. delete it (``directory.delete_checkpoint``): the index first, so it disappears
   atomically, then those of its data objects that no other committed index names
   (``references.delete_unreferenced``) - an incremental checkpoint's shared bytes stay;
3. drop the ``deleting`` mark again (another CAS). If this process dies between 1 and 3,
   the next manager that owns the directory finishes the deletion from that mark.

Why the state file first: a resume reads it for the newest checkpoint; removing the index
first would leave a listed checkpoint without an index (skipped, but with a warning).

A running manager in the same directory sees its state file changed at its next save and
stops with ``ConcurrentWriterError`` (the fencing every foreign write of the state file
triggers): remove checkpoints of a job that is not saving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from cloudckpt.errors import CheckpointFormatError, CheckpointNotFoundError, CheckpointStateError, PreconditionError
from cloudckpt.format import index_key
from cloudckpt.format.index_fetch import head_index, newer_format
from cloudckpt.format.references import listed_sizes
from cloudckpt.format.sniff import ForeignCheckpoint, load_any_index
from cloudckpt.format.state_file import STATE_KEY, CheckpointState, read_state, write_state
from cloudckpt.manager.directory import delete_checkpoint, relative_name
from cloudckpt.storage import CheckpointPath, Storage, resolve

log = logging.getLogger("cloudckpt.manager")

#: Compare-and-swap attempts on the state file before giving up (each one re-reads it).
CAS_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class Removal:
    """What ``remove_checkpoint`` did.

    Attributes:
        url: the checkpoint removed.
        deleted: its data objects that were deleted.
        kept: its data objects kept because other committed checkpoints name them.
        state_updated: whether the directory's state file listed it (and was rewritten).
        latest: the checkpoint the state file names as the latest afterwards (``None``: none).
        kept_bytes: the kept data objects' size, as listed after the deletion.
    """

    url: str
    deleted: tuple[str, ...]
    kept: tuple[str, ...]
    state_updated: bool
    latest: str | None
    kept_bytes: int = 0


def remove_checkpoint(path: CheckpointPath) -> Removal:
    """Delete the checkpoint ``path`` and take it out of its directory's state file.

    Reference-aware like a manager's eviction: data objects that other committed checkpoints
    (incremental saves) still name are kept. See the module docs for the order of steps.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``path`` (no index, and the state file
            does not list it).
        CheckpointVersionError: its index is of a newer format version (a newer cloudckpt
            owns it; nothing is changed).
        CheckpointFormatError: it is another framework's checkpoint (TensorFlow, torch DCP, Orbax) (nothing is changed).
        PreconditionError: the state file kept changing under the compare-and-swap.
    """
    location = resolve(path)
    storage, name = location.storage, location.name
    objects = _objects_of(storage, name, location.url)
    _, listed = _update_state(storage, lambda state: _without(state, name, storage.url))
    if objects is None and not listed:
        raise CheckpointNotFoundError(f"no checkpoint at {location.url} ({index_key(name)} does not exist and "
                                      f"the state file does not list it)", location.url)
    delete_checkpoint(storage, name)
    after, _ = _update_state(storage, lambda state: _unmark(state, name, storage.url))
    remaining = listed_sizes(storage, objects or ())
    latest = after.model_checkpoint_path if after is not None else None
    return Removal(location.url, tuple(sorted(set(objects or ()) - remaining.keys())), tuple(sorted(remaining)),
                   listed, relative_name(latest, storage.url) if latest else None, sum(remaining.values()))


def _objects_of(storage: Storage, name: str, url: str) -> list[str] | None:
    """The data objects ``name``'s index names (``[]``: unreadable index; ``None``: no index).

    Raises:
        CheckpointVersionError / CheckpointFormatError: a newer-format or another framework's checkpoint.
    """
    if head_index(storage, name) is None:
        return None
    try:
        found = load_any_index(storage, name)
    except CheckpointFormatError as exc:
        if newer_format(exc) is not None:  # valid for the newer cloudckpt that owns it
            raise
        log.warning("the index of %s is unreadable (%s): removing it; its data objects are left to "
                    "`cloudckpt gc`", url, exc)
        return []
    if isinstance(found, ForeignCheckpoint):
        raise CheckpointFormatError(
            f"{url} is a {found.format.value}; remove_checkpoint removes cloudckpt checkpoints only", url)
    return [] if found is None else [o.name for o in found.objects]


def _update_state(storage: Storage, change: Callable[[CheckpointState], CheckpointState | None]
                  ) -> tuple[CheckpointState | None, bool]:
    """Apply ``change`` to the state file by compare-and-swap: the state now (``None``: no usable
    state file) and whether it was rewritten. ``change`` returns ``None`` for "nothing to change"."""
    for _ in range(CAS_ATTEMPTS):
        try:
            found = read_state(storage)
        except PreconditionError:
            continue  # replaced while being read
        except CheckpointStateError as exc:
            log.warning("leaving the unreadable state file %s alone: %s", storage.url_for(STATE_KEY), exc)
            return None, False
        if found is None:
            return None, False
        state, version = found
        changed = change(state)
        if changed is None:
            return state, False
        try:
            write_state(storage, changed, version)
        except PreconditionError:
            continue
        return changed, True
    raise PreconditionError(f"could not update {storage.url_for(STATE_KEY)}: it kept changing under us",
                            storage.url_for(STATE_KEY))


def _without(state: CheckpointState, name: str, directory: str) -> CheckpointState | None:
    """``state`` with ``name`` out of every list (and marked ``deleting``), or ``None`` if it lists it nowhere."""
    def named(path: str) -> bool:
        return relative_name(path, directory) == name

    paths = state.all_model_checkpoint_paths
    kept = [i for i, p in enumerate(paths) if not named(p)]
    latest = state.model_checkpoint_path
    if len(kept) == len(paths) and not (latest and named(latest)) and name not in state.preserved:
        return None
    stamps = state.all_model_checkpoint_timestamps
    if latest and named(latest):
        latest = paths[kept[-1]] if kept else None
    return replace(state, model_checkpoint_path=latest, all_model_checkpoint_paths=[paths[i] for i in kept],
                   all_model_checkpoint_timestamps=[stamps[i] for i in kept] if len(stamps) == len(paths) else [],
                   preserved={n: t for n, t in state.preserved.items() if n != name},
                   metrics={n: v for n, v in state.metrics.items() if n != name},
                   deleting=[*(d for d in state.deleting if not named(d)), name])


def _unmark(state: CheckpointState, name: str, directory: str) -> CheckpointState | None:
    """``state`` without the ``deleting`` mark of ``name`` (``None``: it carries none)."""
    rest = [d for d in state.deleting if relative_name(d, directory) != name]
    if len(rest) == len(state.deleting):
        return None
    return replace(state, deleting=rest)
