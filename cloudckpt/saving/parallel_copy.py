"""The async save's host copies into its staging area, split into pieces run on a few threads.

Why: one thread copying a 1 GiB state took 0.121 s here, longer than Orbax blocks its caller
(0.067 s: on CPU it does not copy at all, it keeps ``np.asarray`` views of jax's immutable
buffers). cloudckpt copies, because numpy arrays and torch tensors are mutable and the
promise is that once ``save`` returns the caller may change, delete or donate every array;
numpy's copies release the GIL and memory bandwidth rises with threads, so the bytes of one
save are split into pieces of about ``PIECE_BYTES`` (small arrays packed together) and copied
by a small pool shared by every save. The pieces write into the staging buffer the caller
already sized, so the budget bounds them as before. A piece that fails fails the save: every
other piece is waited for first, so nothing still writes into the buffer once ``copy_all``
raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

#: Bytes one piece copies (large enough that a task's overhead is noise, small enough that a
#: 1 GiB state gives every thread many pieces).
PIECE_BYTES = 16 * 1024 * 1024
#: Copy threads: memcpy bandwidth stops rising after a few; more only compete with the caller.
WORKERS = max(2, min(8, os.cpu_count() or 2))

Piece = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]  # (destination, source), same shape

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def copy_piece(dest: np.ndarray[Any, Any], src: np.ndarray[Any, Any]) -> None:
    """Copy one piece (the seam tests instrument to count threads and pieces, or to fail one)."""
    np.copyto(dest, src, casting="no")


def split(dest: np.ndarray[Any, Any], src: np.ndarray[Any, Any], piece_bytes: int) -> list[Piece]:
    """``(dest, src)`` as views of at most about ``piece_bytes`` each.

    A C-contiguous source is split along its flattened elements; another (a transposed or
    strided view) along its first axis, whole rows per piece.
    """
    nbytes = int(src.nbytes)
    if nbytes <= piece_bytes or src.ndim == 0:
        return [(dest, src)]
    if src.flags.c_contiguous and dest.flags.c_contiguous:
        flat_dest, flat_src = dest.reshape(-1), src.reshape(-1)
        step = max(1, piece_bytes // src.itemsize)
        return [(flat_dest[i:i + step], flat_src[i:i + step]) for i in range(0, flat_src.size, step)]
    rows = src.shape[0]
    step = max(1, piece_bytes // max(1, nbytes // rows))
    return [(dest[i:i + step], src[i:i + step]) for i in range(0, rows, step)]


def _tasks(copies: Sequence[Piece], piece_bytes: int) -> list[list[Piece]]:
    """The pieces of every copy, packed into tasks of about ``piece_bytes`` each."""
    tasks: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for dest, src in copies:
        for piece in split(dest, src, piece_bytes):
            current.append(piece)
            size += int(piece[1].nbytes)
            if size >= piece_bytes:
                tasks.append(current)
                current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


def _run(task: list[Piece]) -> None:
    for dest, src in task:
        copy_piece(dest, src)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cloudckpt-stage-copy")
        return _pool


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's threads: a pool inherited from it would never run."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def copy_all(copies: Sequence[Piece], piece_bytes: int | None = None) -> int:
    """Copy every ``(dest, src)`` pair; returns the number of tasks run (one runs inline).

    Raises the first failure (in task order) after every task finished.
    """
    tasks = _tasks(copies, PIECE_BYTES if piece_bytes is None else piece_bytes)
    if len(tasks) <= 1:
        for task in tasks:
            _run(task)
        return len(tasks)
    pool = _executor()
    futures: list[Future[None]] = [pool.submit(_run, task) for task in tasks]
    failure: BaseException | None = None
    for future in futures:  # every one waited for: none may write into the buffer after we return
        exc = future.exception()
        if exc is not None and failure is None:
            failure = exc
    if failure is not None:
        raise failure
    return len(tasks)
