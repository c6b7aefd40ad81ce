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
import re
from dataclasses import dataclass, field

from cloudckpt.errors import CheckpointStateError, NotFoundError, PreconditionError
from cloudckpt.storage import ObjectMeta, Storage, UpdateVersion

log = logging.getLogger("cloudckpt.state_file")

STATE_KEY = "checkpoint"
_MAX_STATE_BYTES = 16 * 1024 * 1024
_RECORD_ATTEMPTS = 20

_LINE = re.compile(r"^\s*([A-Za-z_]+)\s*:\s*(.*?)\s*$")
_EXTRA = re.compile(r"^#\s*cloudckpt-([a-z]+)\s*:\s*(.*?)\s*$")
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"(.*)$')


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
    """Parse state-file text; ``CheckpointStateError`` naming ``where`` and the line if bad."""
    state = CheckpointState()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            _parse_extra(stripped, state, where, number)
            continue
        match = _LINE.match(stripped)
        if not match:
            raise CheckpointStateError(f"{where} line {number}: expected 'field: value', got {line!r}")
        name, raw = match.groups()
        if name == "model_checkpoint_path":
            state.model_checkpoint_path = _string(raw, where, number)
        elif name == "all_model_checkpoint_paths":
            state.all_model_checkpoint_paths.append(_string(raw, where, number))
        elif name == "all_model_checkpoint_timestamps":
            state.all_model_checkpoint_timestamps.append(_number(raw, where, number))
        elif name == "last_preserved_timestamp":
            state.last_preserved_timestamp = _number(raw, where, number)
        else:
            raise CheckpointStateError(f"{where} line {number}: unknown field {name!r}")
    if state.all_model_checkpoint_timestamps and (
            len(state.all_model_checkpoint_timestamps) != len(state.all_model_checkpoint_paths)):
        raise CheckpointStateError(
            f"{where}: {len(state.all_model_checkpoint_paths)} paths but "
            f"{len(state.all_model_checkpoint_timestamps)} timestamps")
    return state


def _parse_extra(line: str, state: CheckpointState, where: str, number: int) -> None:
    match = _EXTRA.match(line)
    if not match:
        return  # an ordinary comment
    kind, raw = match.groups()
    if kind == "writer":
        state.writer = raw or None
    elif kind == "deleting":
        state.deleting.append(_string(raw, where, number))
    elif kind in ("preserved", "metric"):
        quoted = _QUOTED.match(raw)
        if not quoted:
            raise CheckpointStateError(f"{where} line {number}: bad cloudckpt-{kind} entry {raw!r}")
        name = _unescape(quoted.group(1))
        value = _number(quoted.group(2).strip(), where, number)
        (state.preserved if kind == "preserved" else state.metrics)[name] = value


def _string(raw: str, where: str, number: int) -> str:
    match = _QUOTED.match(raw)
    if not match or match.group(2).strip():
        raise CheckpointStateError(f"{where} line {number}: expected a quoted string, got {raw!r}")
    value = _unescape(match.group(1))
    if not value or "\x00" in value:
        raise CheckpointStateError(f"{where} line {number}: empty or invalid path")
    return value


def _number(raw: str, where: str, number: int) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise CheckpointStateError(f"{where} line {number}: expected a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise CheckpointStateError(f"{where} line {number}: timestamp must be finite, got {raw!r}")
    return value


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), text)


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


def record_checkpoint(storage: Storage, name: str) -> None:
    """What ``tf.train.Checkpoint.save`` does: point the state file at ``name`` alone.

    Like TensorFlow, no timestamps are recorded, so a ``CheckpointManager`` that later
    adopts the directory never deletes these checkpoints. Compare-and-swap retried, so two
    savers never interleave a half-merged file; a garbage state file is replaced.
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
            current_meta = current[1] if current else None
        state = CheckpointState(model_checkpoint_path=name, all_model_checkpoint_paths=[name])
        try:
            write_state(storage, state, current_meta)
            return
        except PreconditionError:
            continue
    raise PreconditionError(f"could not update {storage.url_for(STATE_KEY)}: it kept changing under us",
                            storage.url_for(STATE_KEY))
