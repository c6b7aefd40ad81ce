"""Questions about a checkpoint directory, answered from storage: what is the newest
committed checkpoint, what does the state file say, and deleting one checkpoint.

Read-only except ``delete_checkpoint``. Used by ``CheckpointManager``, the module-level
``latest_checkpoint`` and the CLI, so all of them agree on what "latest" means.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from cloudckpt._testhooks import crash_point
from cloudckpt.errors import CheckpointFormatError, CheckpointStateError, PreconditionError
from cloudckpt.format import INDEX_SUFFIX, index_key
from cloudckpt.format.index_fetch import newer_format, read_index
from cloudckpt.format.references import delete_unreferenced
from cloudckpt.format.state_file import CheckpointState, read_state
from cloudckpt.storage import Directory, ObjectMeta, Storage, join_url, resolve_directory

log = logging.getLogger("cloudckpt.manager")


def relative_name(name: str, directory: str) -> str:
    """State files written by TensorFlow may hold absolute paths; we store relative ones."""
    prefix = directory.rstrip("/") + "/"
    return name[len(prefix):] if name.startswith(prefix) else name


def usable_name(name: str) -> bool:
    """Whether ``name`` can be a checkpoint directly in the directory (no '/', '..', NUL)."""
    return bool(name) and "/" not in name and "\\" not in name and "\x00" not in name and name not in (".", "..")


def read_state_tolerant(storage: Storage, *, on_garbled: Callable[[CheckpointStateError], None]
                        ) -> tuple[CheckpointState, ObjectMeta] | None:
    """The state file and its version, or ``None`` when it is absent - or garbled.

    A garbled state file (invalid text, or listing names that cannot be checkpoints in
    this directory, such as ``../elsewhere``) is reported to ``on_garbled`` and treated as
    absent: the caller then finds checkpoints by listing, so a job can still resume from
    what the directory really holds. A file replaced while being read is read once more.
    """
    try:
        try:
            found = read_state(storage)
        except PreconditionError:
            found = read_state(storage)  # replaced mid-read: once more is enough to see a stable file
        if found is not None:
            _check_names(found[0], storage)
    except CheckpointStateError as exc:
        on_garbled(exc)
        return None
    return found


def _check_names(state: CheckpointState, storage: Storage) -> None:
    directory = storage.url
    names = [*state.all_model_checkpoint_paths, *([state.model_checkpoint_path] if state.model_checkpoint_path else [])]
    for name in names:
        if not usable_name(relative_name(name, directory)):
            raise CheckpointStateError(f"{storage.url_for('checkpoint')} lists {name!r}, which is not a checkpoint "
                                       f"in {directory}")


def first_committed(storage: Storage, names: Sequence[str]) -> str | None:
    """The first of ``names`` (newest first) whose index exists, warning about those that are gone."""
    for name in names:
        if storage.exists(index_key(name)):
            return name
        log.warning("checkpoint %s is listed but its index is gone; skipping it", storage.url_for(name))
    return None


def latest_by_listing(storage: Storage) -> str | None:
    """The highest-numbered ``<name>-<N>`` with an index (newest upload wins a tie)."""
    best: tuple[int, float, str] | None = None
    for meta in storage.list(""):
        if "/" in meta.key or not meta.key.endswith(INDEX_SUFFIX):
            continue
        name = meta.key[: -len(INDEX_SUFFIX)]
        stem, _, number = name.rpartition("-")
        if not stem or not number.isdigit():
            continue
        stamp = meta.last_modified.timestamp() if meta.last_modified else 0.0
        key = (int(number), stamp, name)
        if best is None or key > best:
            best = key
    return best[2] if best else None


def latest_name(storage: Storage) -> str | None:
    """The newest *committed* checkpoint's name in ``storage``'s directory, or ``None``.

    Walks the state file's list from newest to oldest and returns the first whose index
    exists. Lists the directory only when there is no usable state file, or it names no
    checkpoint at all (a manager claimed the directory and was killed before its first
    save was recorded): then the highest-numbered ``<name>-<N>.index`` wins.
    """
    found = read_state_tolerant(
        storage, on_garbled=lambda exc: log.warning("%s; finding the latest checkpoint by listing instead", exc))
    if found is None or not (found[0].model_checkpoint_path or found[0].all_model_checkpoint_paths):
        return latest_by_listing(storage)
    state = found[0]
    candidates = [relative_name(p, storage.url) for p in reversed(state.all_model_checkpoint_paths)]
    if state.model_checkpoint_path:
        newest = relative_name(state.model_checkpoint_path, storage.url)
        if newest not in candidates:
            candidates.insert(0, newest)
    return first_committed(storage, candidates)


def delete_checkpoint(storage: Storage, name: str) -> None:
    """Index first (the checkpoint disappears atomically), then the data objects it names
    that no other committed index names (``references.delete_unreferenced``).

    Never "everything under the prefix": a concurrent re-save of the same number has
    data objects with other (write-unique) names that must survive, and an incremental
    checkpoint may name this one's objects.

    A checkpoint of a newer format version is left whole: it is intact for the cloudckpt
    that wrote it, and its index may name objects this version cannot see.
    """
    try:
        index = read_index(storage, name)
    except CheckpointFormatError as exc:
        if newer_format(exc) is not None:
            log.warning("not deleting %s: %s", storage.url_for(name), exc)
            return
        log.warning("not deleting data objects of %s: its index is unreadable (%s)", storage.url_for(name), exc)
        storage.delete(index_key(name))
        return
    if index is None:
        return
    objects = [obj.name for obj in index.objects]
    storage.delete(index_key(name))
    crash_point("after_delete_index")
    deleted = delete_unreferenced(storage, objects)
    crash_point("after_delete_data")
    log.info("deleted checkpoint %s (%d of its %d data objects; the rest are named by other checkpoints)",
             storage.url_for(name), len(deleted), len(objects))


def shown_directory(directory: Directory) -> str:
    return directory.url if isinstance(directory, Storage) else os.fspath(directory)


def latest_checkpoint(checkpoint_dir: Directory) -> str | None:
    """The newest *committed* checkpoint in ``checkpoint_dir`` (full path), or ``None``.

    See ``directory.latest_name``: the state file's list newest first, the first whose
    index exists; the directory is listed only when there is no usable state file.
    """
    name = latest_name(resolve_directory(checkpoint_dir))
    return join_url(shown_directory(checkpoint_dir), name) if name else None
