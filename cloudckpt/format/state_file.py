"""The directory state file ``<directory>/checkpoint``: TensorFlow's text format, CAS-replaced.

One module reads and writes it for both ``Checkpoint.save`` and ``CheckpointManager``.
The format is TensorFlow's ``CheckpointState`` text proto, so ``tf.train.latest_checkpoint``
reads our directories::

    model_checkpoint_path: "ckpt-7"
    all_model_checkpoint_paths: "ckpt-6"
    all_model_checkpoint_paths: "ckpt-7"
    all_model_checkpoint_timestamps: 1700000000.25
    all_model_checkpoint_timestamps: 1700000100.5
    last_preserved_timestamp: 1699999999.0

TensorFlow's parser rejects unknown fields but skips ``#`` comments, so cloudckpt's own
bookkeeping rides in comments: ``# cloudckpt-writer: <token>`` (who owns the directory),
``# cloudckpt-preserved: "ckpt-3" <timestamp>`` (kept forever by
``keep_checkpoint_every_n_hours``), ``# cloudckpt-metric: "ckpt-7" <value>`` (for
keep-best), ``# cloudckpt-deleting: "ckpt-5"`` (evicted; its deletion may not have finished,
so the next owner finishes it even if this one is killed mid-way). Paths are stored
relative to the directory.

The file is one object, replaced atomically by compare-and-swap on its version, so two
writers can never silently overwrite each other's bookkeeping.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from cloudckpt.errors import CheckpointStateError, ConcurrentWriterError, NotFoundError, PreconditionError
from cloudckpt.storage import ObjectMeta, Storage, UpdateVersion

log = logging.getLogger("cloudckpt.format.state_file")

STATE_KEY = "checkpoint"
_MAX_STATE_BYTES = 16 * 1024 * 1024
_RECORD_ATTEMPTS = 20

#: Longest number token parsed (a timestamp or metric is ~20 characters; float() of a
#: megabyte of digits is slow for nothing).
_MAX_NUMBER_CHARS = 64
_FIELD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_EXTRA_PREFIX = "cloudckpt-"


@dataclass(slots=True)
class CheckpointState:
    """The parsed state file. Paths are relative to the directory, oldest first."""

    model_checkpoint_path: str | None = None
    all_model_checkpoint_paths: list[str] = field(default_factory=list)
    all_model_checkpoint_timestamps: list[float] = field(default_factory=list)
    last_preserved_timestamp: float | None = None
    writer: str | None = None
    preserved: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    deleting: list[str] = field(default_factory=list)


def parse(text: str, where: str) -> CheckpointState:
    """Parse state-file text; ``CheckpointStateError`` naming ``where`` and the line if bad.

    Linear in the text, with string methods and one scan per quoted string - no
    backtracking regular expression: the file comes from a bucket others may write to, and
    a regex such as ``\\s*(.*?)\\s*$`` took seconds on one line of 40,000 spaces.

    Paths are checked as well as parsed: an empty name, a NUL or backslash, or a ``.`` or
    ``..`` segment (``../other-run/ckpt-3``) makes the file garbled, so callers warn and
    fall back to listing the directory instead of failing later on a key the store refuses.
    Absolute paths (TensorFlow writes them) are left to the caller to make relative.
    """
    state = CheckpointState()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            _parse_extra(stripped[1:].lstrip(), state, where, number)
            continue
        name, colon, raw = stripped.partition(":")
        name = name.rstrip()
        if not colon or not name or not _FIELD_CHARS.issuperset(name):
            raise CheckpointStateError(f"{where} line {number}: expected 'field: value', got {_shown(line)}")
        raw = raw.strip()
        if name == "model_checkpoint_path":
            state.model_checkpoint_path = _path(raw, where, number)
        elif name == "all_model_checkpoint_paths":
            state.all_model_checkpoint_paths.append(_path(raw, where, number))
        elif name == "all_model_checkpoint_timestamps":
            state.all_model_checkpoint_timestamps.append(_number(raw, where, number))
        elif name == "last_preserved_timestamp":
            state.last_preserved_timestamp = _number(raw, where, number)
        else:
            raise CheckpointStateError(f"{where} line {number}: unknown field {_shown(name)}")
    if state.all_model_checkpoint_timestamps and (
            len(state.all_model_checkpoint_timestamps) != len(state.all_model_checkpoint_paths)):
        raise CheckpointStateError(
            f"{where}: {len(state.all_model_checkpoint_paths)} paths but "
            f"{len(state.all_model_checkpoint_timestamps)} timestamps")
    return state


def _shown(text: str) -> str:
    """``text`` for a message: repr'd, and cut short (a hostile line may be megabytes long)."""
    return repr(text) if len(text) <= 80 else f"{text[:77]!r}... ({len(text)} characters)"


def _parse_extra(comment: str, state: CheckpointState, where: str, number: int) -> None:
    """A ``# cloudckpt-KIND: VALUE`` comment (``comment`` is the text after ``#``); others are ignored."""
    if not comment.startswith(_EXTRA_PREFIX):
        return  # an ordinary comment
    kind, colon, raw = comment[len(_EXTRA_PREFIX):].partition(":")
    kind = kind.rstrip()
    if not colon or not kind.isascii() or not kind.isalpha() or not kind.islower():
        return  # an ordinary comment that happens to start with "cloudckpt-"
    raw = raw.strip()
    if kind == "writer":
        state.writer = raw or None
    elif kind == "deleting":
        state.deleting.append(_path(raw, where, number))
    elif kind in ("preserved", "metric"):
        try:
            quoted, rest = _scan_quoted(raw)
        except ValueError:
            raise CheckpointStateError(f"{where} line {number}: bad cloudckpt-{kind} entry {_shown(raw)}") from None
        name = _checked_path(quoted, where, number)
        value = _number(rest.strip(), where, number)
        (state.preserved if kind == "preserved" else state.metrics)[name] = value


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


def _scan_quoted(raw: str) -> tuple[str, str]:
    """``"text"rest`` -> (unescaped text, rest); ``ValueError`` without both quotes.

    Linear: each character is looked at a bounded number of times (the next quote is
    searched for again only once an escape has carried the scan past it).
    """
    if not raw.startswith('"'):
        raise ValueError("no opening quote")
    out: list[str] = []
    i = 1
    close = raw.find('"', i)
    while close >= 0:
        slash = raw.find("\\", i, close)
        if slash < 0:
            out.append(raw[i:close])
            return "".join(out), raw[close + 1:]
        out.append(raw[i:slash])
        out.append(_ESCAPES.get(raw[slash + 1], raw[slash + 1]))  # slash < close: the index exists
        i = slash + 2
        if i > close:  # the quote found was the escaped one
            close = raw.find('"', i)
    raise ValueError("no closing quote")


def _path(raw: str, where: str, number: int) -> str:
    """A quoted checkpoint path with nothing after it, checked by ``_checked_path``."""
    try:
        value, rest = _scan_quoted(raw)
    except ValueError:
        raise CheckpointStateError(f"{where} line {number}: expected a quoted string, got {_shown(raw)}") from None
    if rest.strip():
        raise CheckpointStateError(f"{where} line {number}: expected a quoted string, got {_shown(raw)}")
    return _checked_path(value, where, number)


def _checked_path(value: str, where: str, number: int) -> str:
    """Refuse names that cannot be a checkpoint in this directory (see ``parse``)."""
    if not value or "\x00" in value or "\\" in value:
        raise CheckpointStateError(f"{where} line {number}: empty or invalid path {_shown(value)}")
    if any(part in (".", "..") for part in value.split("/")):
        raise CheckpointStateError(
            f"{where} line {number}: path {_shown(value)} has a '.' or '..' segment (it would leave the directory)")
    return value


def _number(raw: str, where: str, number: int) -> float:
    if len(raw) > _MAX_NUMBER_CHARS:
        raise CheckpointStateError(f"{where} line {number}: expected a number, got {_shown(raw)}")
    try:
        value = float(raw)
    except ValueError:
        raise CheckpointStateError(f"{where} line {number}: expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise CheckpointStateError(f"{where} line {number}: timestamp must be finite, got {raw!r}")
    return value


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def format_state(state: CheckpointState) -> str:
    """Render ``state`` as TensorFlow reads it (extras as ``#`` comments)."""
    lines = []
    if state.model_checkpoint_path:
        lines.append(f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}")
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in state.all_model_checkpoint_timestamps]
    if state.last_preserved_timestamp is not None:
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    if state.writer:
        lines.append(f"# cloudckpt-writer: {state.writer}")
    lines += [f"# cloudckpt-preserved: {_quote(n)} {t!r}" for n, t in state.preserved.items()]
    lines += [f"# cloudckpt-metric: {_quote(n)} {v!r}" for n, v in state.metrics.items()]
    lines += [f"# cloudckpt-deleting: {_quote(n)}" for n in state.deleting]
    return "\n".join(lines) + "\n"


def read_state(storage: Storage) -> tuple[CheckpointState, ObjectMeta] | None:
    """The state and the version it was read at, or ``None`` when there is no state file.

    Raises:
        CheckpointStateError: the file exists but is not valid (the caller decides
            whether to recover by listing the directory).
    """
    try:
        meta = storage.head(STATE_KEY)
    except NotFoundError:
        return None
    url = storage.url_for(STATE_KEY)
    if meta.size > _MAX_STATE_BYTES:
        raise CheckpointStateError(f"{url} is {meta.size} bytes; a state file is a few KiB")
    raw = storage.get(STATE_KEY)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointStateError(f"{url} is not UTF-8 text") from None
    # The version of what we parsed: re-HEAD so a concurrent replace between HEAD and GET
    # surfaces as a failed compare-and-swap later instead of pairing old bytes with a new version.
    current = storage.head(STATE_KEY)
    if current.version != meta.version:
        raise PreconditionError(f"{url} changed while it was being read", url)
    return parse(text, url), current


def write_state(storage: Storage, state: CheckpointState, expected: ObjectMeta | None) -> ObjectMeta:
    """Replace the state file iff it is still at ``expected`` (``None``: iff absent).

    Raises:
        PreconditionError: another writer replaced (or created) it since ``expected``.
    """
    data = format_state(state).encode("utf-8")
    if not storage.supports_conditional_writes:
        return storage.put(STATE_KEY, data)  # documented: such stores cannot fence writers
    if expected is None:
        return storage.put(STATE_KEY, data, mode="create")
    return storage.put(STATE_KEY, data, mode=UpdateVersion(expected.version or ""))


def check_unmanaged(storage: Storage, name: str) -> None:
    """Refuse, before anything is written, a ``Checkpoint.save`` into a manager's directory.

    ``record_checkpoint`` refuses too, but only after the checkpoint was written; a caller
    that calls this first fails without writing anything. A garbled or absent state file
    is not a manager's (``record_checkpoint`` replaces a garbled one, as before).

    Raises:
        ConcurrentWriterError: the state file carries a ``CheckpointManager``'s writer token.
    """
    try:
        found = read_state(storage)
    except (CheckpointStateError, PreconditionError):
        return
    if found is not None and found[0].writer:
        raise _managed(storage, name, found[0].writer, written=False)


def _managed(storage: Storage, name: str, token: str, *, written: bool) -> ConcurrentWriterError:
    what = (f"{storage.url_for(name)} was written but not recorded in it" if written
            else f"nothing was written for {storage.url_for(name)}")
    return ConcurrentWriterError(
        f"{storage.url} is managed by a CheckpointManager (its state file {storage.url_for(STATE_KEY)} carries "
        f"writer token {_shown(token)}): Checkpoint.save would replace that file with one listing only its own "
        f"checkpoint and orphan the manager's, so {what}. Save through the manager (manager.save()), into "
        f"another directory, or with Checkpoint.write, which leaves the state file alone")


def record_checkpoint(storage: Storage, name: str) -> None:
    """What ``tf.train.Checkpoint.save`` does: point the state file at ``name`` alone.

    Like TensorFlow, no timestamps are recorded, so a ``CheckpointManager`` that later
    adopts the directory never deletes these checkpoints. Compare-and-swap retried, so two
    savers never interleave a half-merged file; a garbage state file is replaced.

    Unlike TensorFlow, a directory a ``CheckpointManager`` owns (its state file carries a
    writer token) is left alone: rewriting its state file would orphan the manager's
    checkpoints (listed nowhere, and ``gc`` keeps them since they have indexes) and fence
    the manager off at its next save. Adopting the manager's list instead would do the
    latter too, and hand the manager a checkpoint its retention would then delete.

    Raises:
        ConcurrentWriterError: a manager owns the directory (nothing was recorded).
    """
    for _ in range(_RECORD_ATTEMPTS):
        try:
            current = read_state(storage)
        except CheckpointStateError as exc:
            log.warning("replacing unreadable state file: %s", exc)
            current_meta: ObjectMeta | None = storage.head(STATE_KEY)
        except PreconditionError:
            continue
        else:
            if current is not None and current[0].writer:
                raise _managed(storage, name, current[0].writer, written=True)
            current_meta = current[1] if current else None
        state = CheckpointState(model_checkpoint_path=name, all_model_checkpoint_paths=[name])
        try:
            write_state(storage, state, current_meta)
            return
        except PreconditionError:
            continue
    raise PreconditionError(f"could not update {storage.url_for(STATE_KEY)}: it kept changing under us",
                            storage.url_for(STATE_KEY))
