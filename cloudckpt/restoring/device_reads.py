"""Restoring into device memory (CUDA tensors): ranged reads into bounce buffers, copies overlapping reads.

Why not ``read_new`` + ``tensor.copy_``: that holds a host copy of every device tensor at once
(the whole state in pageable memory) and copies each synchronously after all reads. Here each
device array is cut into blocks of whole rows (dimension 0) of at most ``BOUNCE_BYTES``; a
round of blocks is read with the one ranged reader (``array_reads.read_arrays``: only the
bytes of each block, CRC32C-verified on the host bytes before anything is copied), then the
array's copier copies the round into the destination rows - the CUDA copier non-blocking on
its side stream from pinned bounce buffers - while the next round is read. Host memory is
the bounce ring (``BOUNCE_SLOTS`` buffers), and nothing of the whole tensor is allocated on
either side: the bytes land straight in the destination tensor.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cloudckpt.format import ArrayEntry, CheckpointIndex, parse_dtype
from cloudckpt.leaves.copier import DeviceArray, HostBytes, HostRing, Pending
from cloudckpt.restoring.array_reads import read_arrays
from cloudckpt.restoring.buffers import ReadTarget
from cloudckpt.storage import Storage

MiB = 1024 * 1024
#: Bytes of one bounce buffer (a block of whole rows; a row larger than this gets a buffer of its own size).
BOUNCE_BYTES = 64 * MiB
#: Bounce buffers in the ring: half are read into while the other half is copied to the device.
BOUNCE_SLOTS = 4


@dataclass(frozen=True, slots=True)
class DeviceTarget:
    """One device array (or the box of it at ``start`` in the global array) to fill from ``entry``."""

    path: str
    entry: ArrayEntry
    dest: DeviceArray
    start: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class _Block:
    target: DeviceTarget
    rows: tuple[int, int]
    nbytes: int


def _blocks(target: DeviceTarget, bounce_bytes: int) -> list[_Block]:
    shape = target.dest.shape
    if not shape:
        return [_Block(target, (0, 0), target.dest.nbytes)]
    if target.dest.nbytes == 0:
        return []
    row = target.dest.nbytes // shape[0]
    step = max(1, bounce_bytes // max(row, 1))
    return [_Block(target, (r, min(r + step, shape[0])), (min(r + step, shape[0]) - r) * row)
            for r in range(0, shape[0], step)]


def read_to_device(storage: Storage, index: CheckpointIndex, targets: Sequence[DeviceTarget], *,
                   bounce_bytes: int | None = None,
                   slots: int | None = None) -> None:
    """Fill every device target through bounce buffers; see the module docstring. Reads storage
    directly, in rounds: a restore through the io host's relay uses ``staged_reads`` instead.

    Raises what ``read_arrays`` raises (``ChecksumError`` names the key); a failure after the
    first round leaves the destination tensors partly written.
    """
    bounce_bytes = BOUNCE_BYTES if bounce_bytes is None else bounce_bytes
    slots = BOUNCE_SLOTS if slots is None else slots
    per_round = max(1, slots // 2)
    by_copier: dict[int, list[_Block]] = {}  # a round is one copier's: its event covers its batch
    for block in (b for t in targets for b in _blocks(t, bounce_bytes)):
        by_copier.setdefault(id(block.target.dest.copier), []).append(block)
    rounds = [group[i:i + per_round] for group in by_copier.values() for i in range(0, len(group), per_round)]
    rings: dict[int, HostRing] = {}
    in_flight: deque[tuple[Pending, HostRing, list[HostBytes]]] = deque()

    def settle_oldest() -> None:
        pending, ring, buffers = in_flight.popleft()
        pending.wait()
        for buffer in buffers:
            ring.release(buffer)

    try:
        for round_blocks in rounds:
            while len(in_flight) >= 2 or (in_flight and _ring_full(rings, round_blocks, per_round)):
                settle_oldest()
            ring = rings.setdefault(id(round_blocks[0].target.dest.copier),
                                    HostRing(round_blocks[0].target.dest.copier, slots))
            buffers = [ring.acquire(b.nbytes) for b in round_blocks]
            reads = [_read_target(b, buf) for b, buf in zip(round_blocks, buffers, strict=True)]
            try:
                read_arrays(storage, index, reads)
            except BaseException:
                for buffer in buffers:
                    ring.release(buffer)
                raise
            batch = [(buf[:b.nbytes], b.target.dest, b.rows) for b, buf in zip(round_blocks, buffers, strict=True)]
            in_flight.append((ring.copier.to_device(batch), ring, buffers))
    finally:
        while in_flight:
            settle_oldest()


def staged_reads(targets: Sequence[DeviceTarget]) -> tuple[list[ReadTarget], Callable[[], None]]:
    """The device targets as whole host reads, and the step that copies them in after.

    For a restore whose reads are one collective (the io host's relay: every rank must pass
    through it exactly once), where rounds of bounce reads would differ in number between
    ranks; it costs a host buffer of each device array, as the plain path did.
    """
    reads: list[ReadTarget] = []
    copies: list[tuple[HostBytes, DeviceArray, tuple[int, int]]] = []
    for target in targets:
        buffer = np.empty(target.dest.nbytes, dtype=np.uint8)
        block = _Block(target, (0, target.dest.shape[0] if target.dest.shape else 0), target.dest.nbytes)
        reads.append(_read_target(block, buffer))
        copies.append((buffer, target.dest, block.rows))

    def copy_in() -> None:
        by_copier: dict[int, list[tuple[HostBytes, DeviceArray, tuple[int, int]]]] = {}
        for copy in copies:
            by_copier.setdefault(id(copy[1].copier), []).append(copy)
        for batch in [b for b in by_copier.values() if b]:
            batch[0][1].copier.to_device(batch).wait()

    return reads, copy_in


def _ring_full(rings: dict[int, HostRing], blocks: Sequence[_Block], per_round: int) -> bool:
    ring = rings.get(id(blocks[0].target.dest.copier))
    return ring is not None and ring.in_use + per_round > ring.slots


def _read_target(block: _Block, buffer: HostBytes) -> ReadTarget:
    """The bounce buffer seen as the block's rows, at their place in the stored array."""
    target = block.target
    shape = target.dest.shape
    dtype = parse_dtype(target.entry.dtype)
    if not shape:
        return ReadTarget(target.path, target.entry, buffer[:block.nbytes].view(dtype).reshape(()), live=False,
                          start=target.start)
    rows = block.rows[1] - block.rows[0]
    view = buffer[:block.nbytes].view(dtype).reshape((rows, *shape[1:]))
    origin = target.start or (0,) * len(shape)
    start = (origin[0] + block.rows[0], *origin[1:])
    assert math.prod(view.shape) * dtype.itemsize == block.nbytes
    return ReadTarget(target.path, target.entry, view, live=False, start=start)
