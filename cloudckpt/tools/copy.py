"""``copy``: a checkpoint, or a managed directory, copied between any two stores (``cloudckpt cp``).

One checkpoint is :func:`copy_checkpoint`'s (``copy_one``: data first, streamed and
checked, re-read, the index last). A directory copy copies every committed checkpoint in
order, then the state file, naming only those copied (paths made relative, the writer token
dropped: the copy is unclaimed). It skips a damaged checkpoint (malformed index, bytes failing
their CRC32C, truncated or missing data objects), reports it and copies every intact one, so
the destination's latest is the newest intact checkpoint of the source. It keeps data object
names, so the checkpoints that share an object share its one copy. A sub-directory in a
registered foreign layout (torch DCP's ``step-N/``, as a TorchTitan folder holds them) is
converted into the cloudckpt checkpoint ``step-N`` of the destination directory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloudckpt.errors import (
    AlreadyExistsError,
    CheckpointFormatError,
    CheckpointStateError,
    ChecksumError,
    NotFoundError,
    PreconditionError,
)
from cloudckpt.format import index_key
from cloudckpt.format.state_file import STATE_KEY, CheckpointState, read_state, write_state
from cloudckpt.storage import ObjectMeta, Storage, split_url, url_scheme
from cloudckpt.tools.copy_one import Copied, copy_checkpoint
from cloudckpt.tools.directory import (
    DirectoryScan,
    checkpoint_at,
    no_checkpoints,
    open_directory,
    scan_directory,
    sort_names,
)
from cloudckpt.tools.foreign import is_directory_checkpoint
from cloudckpt.tools.progress import ProgressFactory, silent
from cloudckpt.tools.streaming import destination_storage

__all__ = ["Copied", "CopyReport", "Damaged", "copy", "copy_checkpoint"]


def is_directory_target(dst: str) -> bool:
    """A trailing '/' (or an existing local directory) means "into this directory"."""
    if dst.endswith("/"):
        return True
    return url_scheme(dst) == "file" and "://" not in dst and Path(dst).is_dir()


def _relative(name: str, directory: str) -> str:
    prefix = directory.rstrip("/") + "/"
    return name[len(prefix):] if name.startswith(prefix) else name


def _copy_state(src: Storage, dst: Storage, copied: Sequence[str], force: bool) -> bool:
    """The state file, naming only what was copied, paths made relative and the writer token dropped
    (the copy is unclaimed). ``False`` when the source has none or none of its checkpoints was copied."""
    found = read_state(src)
    if found is None:
        return False
    state = found[0]
    kept = set(copied)
    names = [_relative(p, src.url) for p in state.all_model_checkpoint_paths]
    stamps: list[float | None] = [*state.all_model_checkpoint_timestamps] or [None] * len(names)
    pairs = [(n, t) for n, t in zip(names, stamps, strict=True) if n in kept]
    if not pairs:
        return False
    latest = _relative(state.model_checkpoint_path, src.url) if state.model_checkpoint_path else None
    if latest not in kept:
        latest = pairs[-1][0]  # the source's latest was damaged: the newest one that was copied
    new = CheckpointState(
        model_checkpoint_path=latest, all_model_checkpoint_paths=[n for n, _ in pairs],
        all_model_checkpoint_timestamps=[t for _, t in pairs if t is not None],
        last_preserved_timestamp=state.last_preserved_timestamp, writer=None,
        preserved={k: v for k, v in state.preserved.items() if _relative(k, src.url) in kept},
        metrics={k: v for k, v in state.metrics.items() if _relative(k, src.url) in kept})
    current: ObjectMeta | None
    try:
        current = dst.head(STATE_KEY)
    except NotFoundError:
        current = None
    if current is not None and not force:
        raise AlreadyExistsError(f"{dst.url_for(STATE_KEY)} already exists (use --force to replace it)",
                                 dst.url_for(STATE_KEY))
    try:
        write_state(dst, new, current)
    except PreconditionError as exc:
        raise PreconditionError(f"{dst.url_for(STATE_KEY)} changed while copying: {exc}",
                                dst.url_for(STATE_KEY)) from exc
    return True


def _damage(exc: Exception, src: Storage) -> str | None:
    """Why one checkpoint of a directory could not be copied when the cause is damage, else ``None``.

    Damage - a malformed index, bytes that fail their CRC32C, a truncated or missing data
    object of the source, a copy that reads back wrong - skips that checkpoint; anything else
    (credentials, the network, a full destination, an existing destination) stops the whole copy.
    """
    if isinstance(exc, (CheckpointFormatError, ChecksumError)):
        return _one_line(exc)
    if isinstance(exc, NotFoundError) and (exc.url or "").startswith(src.url.rstrip("/") + "/"):
        return f"an object it names is missing: {_one_line(exc)}"
    return None


def _one_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


@dataclass(frozen=True, slots=True)
class Damaged:
    """A checkpoint of a directory that was not copied because it (or its copy) is damaged."""

    name: str
    url: str
    reason: str


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What :func:`copy` did.

    Attributes:
        copied: each checkpoint copied, in order (one for a single checkpoint).
        damaged: checkpoints of a directory skipped as damaged (they are not at the destination).
        state_copied: whether the state file was copied (naming only the checkpoints copied).
        state_problem: why the source's state file was not copied (it is malformed), if so.
        carried_with: names without an index whose data was copied with the checkpoints that
            read it (an evicted checkpoint an incremental one reuses), and those checkpoints.
        left: names without an index whose data stays behind (no copied checkpoint reads it).
        state_url: the source's and destination's state file URLs (a directory copy).
        directory: whether a directory was copied (rather than one checkpoint).
    """

    copied: tuple[Copied, ...]
    damaged: tuple[Damaged, ...] = ()
    state_copied: bool = False
    state_problem: str | None = None
    carried_with: tuple[tuple[str, tuple[str, ...]], ...] = ()
    left: tuple[str, ...] = ()
    state_url: tuple[str, str] = ("", "")
    directory: bool = False

    @property
    def complete(self) -> bool:
        """Nothing was skipped as damaged (the checkpoints, and the state file)."""
        return not self.damaged and self.state_problem is None


def _unindexed(scan: DirectoryScan, copies: dict[str, Copied]) -> tuple[tuple[tuple[str, tuple[str, ...]], ...],
                                                                          tuple[str, ...]]:
    """What became of the names that have data objects but no index.

    An evicted checkpoint whose objects the copied checkpoints still name was copied with
    them (a directory copy keeps shared objects); only objects no copied checkpoint names -
    crashed saves, which ``gc`` removes, or data only a damaged checkpoint reads - stay behind.
    """
    users: dict[str, set[str]] = {}
    for name, copied in copies.items():
        for obj in copied.carried:
            users.setdefault(obj, set()).add(name)
    carried: list[tuple[str, tuple[str, ...]]] = []
    left: list[str] = []
    for name in scan.names:
        if name in scan.indexes:
            continue
        keys = [m.key for m in scan.data.get(name, [])]
        kept_for = sort_names({user for key in keys for user in users.get(key, ())})
        if kept_for:
            carried.append((name, tuple(kept_for)))
        if any(key not in users for key in keys):
            left.append(name)
    return tuple(carried), tuple(left)


def copy(src_url: str, dst_url: str, *, force: bool = False, reread: bool = True, part_size: int | None = None,
         progress: ProgressFactory = silent, on_copied: Callable[[Copied], None] | None = None,
         on_damaged: Callable[[Damaged], None] | None = None) -> CopyReport:
    """Copy the checkpoint, or every committed checkpoint of the directory, at ``src_url`` to ``dst_url``.

    A checkpoint goes to ``dst_url`` as its new path, or into it when ``dst_url`` ends in
    ``/`` or is an existing local directory; a directory goes into the directory ``dst_url``,
    its state file last. ``on_copied``/``on_damaged`` hear of each checkpoint as it is done.

    Raises:
        AlreadyExistsError: a destination checkpoint or state file exists (without ``force``).
        ChecksumError / CheckpointFormatError: a single checkpoint is damaged (nothing committed).
        CheckpointNotFoundError: the directory holds no committed checkpoint.
    """
    src_url = src_url.rstrip("/") or src_url
    single = checkpoint_at(src_url)
    if single is not None:
        src, src_name = single
        if is_directory_target(dst_url):
            dst, dst_name = destination_storage(dst_url.rstrip("/") or dst_url, part_size), src_name
        else:
            directory, dst_name = split_url(dst_url)
            dst = destination_storage(directory, part_size)
        done = copy_checkpoint(src, src_name, dst, dst_name, force=force, reread=reread, progress=progress)
        if on_copied is not None:
            on_copied(done)
        return CopyReport((done,))
    src = open_directory(src_url)
    scan = scan_directory(src)
    foreign = {sub for sub in scan.subdirectories if is_directory_checkpoint(src, sub)}  # torch DCP's step-N/
    if not scan.indexes and not foreign:
        raise no_checkpoints(src.url, scan)
    dst = destination_storage(dst_url.rstrip("/") or dst_url, part_size)
    names = sort_names(set(scan.indexes) | foreign)
    if not force:
        existing = [n for n in names if dst.exists(index_key(n))]
        if scan.has_state and dst.exists(STATE_KEY):
            existing.append(STATE_KEY)
        if existing:
            raise AlreadyExistsError(f"{dst.url} already has {', '.join(existing)} (use --force to replace)", dst.url)
    copies: dict[str, Copied] = {}
    damaged: list[Damaged] = []
    for name in names:
        try:
            copies[name] = copy_checkpoint(src, name, dst, name, force=force, reread=reread, progress=progress,
                                           ranged=False)
        except Exception as exc:
            reason = _damage(exc, src)
            if reason is None:
                raise
            damaged.append(Damaged(name, src.url_for(name), reason))
            if on_damaged is not None:
                on_damaged(damaged[-1])
        else:
            if on_copied is not None:
                on_copied(copies[name])
    carried, left = _unindexed(scan, copies)
    state_copied, state_problem = False, None
    try:
        state_copied = bool(copies) and _copy_state(src, dst, list(copies), force)
    except CheckpointStateError as exc:
        state_problem = _one_line(exc)
    return CopyReport(tuple(copies.values()), tuple(damaged), state_copied, state_problem, carried, left,
                      (src.url_for(STATE_KEY), dst.url_for(STATE_KEY)), directory=True)
