"""What every command shares: exit codes, one-line errors, progress bars (directory scans: ``cloudckpt.tools``).

Why one place: scripts branch on exit codes and people read the error lines, so both must
mean the same thing in every command. The mapping from the library's error tree onto exit
codes lives here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, TextIO

from cloudckpt.errors import (
    CheckpointFormatError,
    ChecksumError,
    CloudCkptError,
    ConcurrentWriterError,
    InvalidKeyError,
    InvalidURLError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
)
from cloudckpt.tools.directory import no_checkpoints_message
from cloudckpt.tools.progress import ProgressFactory

#: Exit codes, documented in ``cloudckpt --help`` and the README. Scripts rely on them.
EXIT_OK = 0
EXIT_DAMAGED = 1        # verify found damage; a checkpoint or state file is malformed; CRC mismatch
EXIT_USAGE = 2          # bad arguments or URL (argparse uses 2 too)
EXIT_NOT_FOUND = 3      # no such checkpoint, directory, bucket or object
EXIT_PERMISSION = 4     # credentials missing, rejected, or not allowed
EXIT_CONFLICT = 5       # the destination exists (cp without --force), or a concurrent writer won
EXIT_FAILED = 6         # any other storage failure (network, retries exhausted, unsupported)
EXIT_INTERNAL = 70      # a bug in cloudckpt: the traceback is printed
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES_HELP = """exit codes:
  0    success (verify: every checkpoint intact)
  1    damaged: verify found a problem, or a checkpoint/state file is malformed or fails its CRC32C
  2    usage: bad arguments or URL
  3    not found: no such checkpoint, directory or bucket
  4    permission: credentials missing, rejected or not allowed
  5    conflict: the destination exists (use --force), or another writer changed it
  6    other storage failure (network, retries exhausted, unsupported by the store)
  130  interrupted"""

#: Where the SDKs' credential errors end up when they escape the backends' translation.
_CREDENTIAL_ERROR_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                                     "RefreshError", "NoAuthTokenError"})

class CliError(Exception):
    """A failure the CLI itself detects, with the exit code it means."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an expected failure, or ``None`` for a bug (print the traceback)."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, (ChecksumError, CheckpointFormatError)):
        return EXIT_DAMAGED
    if isinstance(exc, (InvalidURLError, InvalidKeyError)):
        return EXIT_USAGE
    if isinstance(exc, NotFoundError | FileNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, PermissionDeniedError | PermissionError) or type(exc).__name__ in _CREDENTIAL_ERROR_NAMES:
        return EXIT_PERMISSION
    if isinstance(exc, (PreconditionError, ConcurrentWriterError, FileExistsError)):
        return EXIT_CONFLICT
    if isinstance(exc, (CloudCkptError, OSError)):
        return EXIT_FAILED
    return None


def one_line(exc: BaseException) -> str:
    """The error as one line: no traceback, newlines folded (messages name the URL)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, CloudCkptError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if type(exc).__name__ in _CREDENTIAL_ERROR_NAMES:
        text = (f"credentials missing or rejected: {text} (S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                f"AWS_PROFILE; GCS: GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login)")
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def fail(message: str) -> None:
    """Print a one-line error (for use by commands that report several)."""
    print(f"cloudckpt: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- output
def human_size(size: int | None) -> str:
    """``1.5 MiB``: sizes people read at a glance (``--json`` has exact bytes)."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_time(stamp: datetime | None) -> str:
    """UTC, to the second: the store's clock stamped it, the local zone would only confuse."""
    return stamp.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


def iso_time(stamp: datetime | None) -> str | None:
    return stamp.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") if stamp else None


def human_age(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def print_table(rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Left-aligned columns; the first row is the header."""
    stream = out or sys.stdout
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=stream)


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``6h``, ``2d``, ``1w`` or plain seconds (argparse type)."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 0s, 30m, 6h, 2d")
    return timedelta(seconds=float(match[1]) * _DURATION_UNITS[match[2]])


_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMG]i?B?)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``5MiB``, ``64M``, ``1048576`` (argparse type); units are binary."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 8MiB")
    unit = (match[2] or "")[:1].upper()
    return int(match[1]) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]


# ---------------------------------------------------------------------------- progress
class Progress:
    """A byte-counting tqdm bar on stderr, or nothing when stderr is not a terminal / ``--quiet``.

    Thread-safe: transfer workers report bytes as they pass. Why stderr: stdout carries the
    command's result (tables, JSON) that scripts parse.
    """

    def __init__(self, total: int, description: str, *, enabled: bool) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        if self._bar is not None and nbytes:
            with self._lock:
                self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def progress_bars(*, enabled: bool) -> ProgressFactory:
    """A tool's progress as bars on stderr (when ``enabled`` and stderr is a terminal)."""
    return lambda total, description: Progress(total, description, enabled=enabled)


# ---------------------------------------------------------------------------- locations
def no_checkpoints_error(url: str, subdirectories: Collection[str]) -> CliError:
    """"Nothing here", with a hint when the checkpoints are one level down."""
    return CliError(no_checkpoints_message(url, subdirectories), EXIT_NOT_FOUND)


# ---------------------------------------------------------------------------- running
def run_command(command: Callable[[Any], int], args: Any) -> int:
    """Run one command, turning expected failures into one line on stderr and an exit code."""
    try:
        return command(args)
    except KeyboardInterrupt:
        fail("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK  # `cloudckpt ls | head`: the reader left, nothing to report
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None or getattr(args, "traceback", False):
            import traceback

            traceback.print_exc()
            return code if code is not None else EXIT_INTERNAL
        fail(one_line(exc))
        return code


def setup_logging(verbosity: int) -> None:
    """Library warnings as ``cloudckpt: warning: ...`` lines; ``-v`` adds info, ``-vv`` debug."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cloudckpt: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("cloudckpt").setLevel(level)


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
