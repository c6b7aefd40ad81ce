"""The async save's host copies: split into pieces run on several threads, every byte exact.

Threads and pieces are counted through ``parallel_copy.copy_piece`` (the seam), never timed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from jax import numpy as jnp

from cloudckpt import Checkpoint, CheckpointOptions, list_variables, load_variable
from cloudckpt.object_graph import ArrayLeaf, Collected
from cloudckpt.saving import parallel_copy
from cloudckpt.saving.async_save import StagingBuffer

KiB = 1024
ASYNC = CheckpointOptions(enable_async=True)


class Recorder:
    """Wraps ``copy_piece``: the threads that ran pieces, how many, and an optional failing piece."""

    def __init__(self, fail_at: int | None = None, meet: int = 0) -> None:
        self.threads: set[int] = set()
        self.pieces = 0
        self.finished = 0
        self.fail_at = fail_at
        self.lock = threading.Lock()
        # the first ``meet`` pieces wait for each other: they can only all pass if they run at once
        self.barrier = threading.Barrier(meet, timeout=20) if meet > 1 else None

    def __call__(self, dest: np.ndarray[Any, Any], src: np.ndarray[Any, Any]) -> None:
        with self.lock:
            index = self.pieces
            self.pieces += 1
            self.threads.add(threading.get_ident())
        if self.barrier is not None and index < self.barrier.parties:
            self.barrier.wait()
        if index == self.fail_at:
            raise OSError(f"piece {index} failed")
        if self.fail_at is not None and index > self.fail_at:
            threading.Event().wait(0.01)  # the pieces after the failed one still run when it fails
        np.copyto(dest, src, casting="no")
        with self.lock:
            self.finished += 1


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(parallel_copy, "PIECE_BYTES", 64 * KiB)
    yield


def record(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Recorder:
    recorder = Recorder(**kwargs)
    monkeypatch.setattr(parallel_copy, "copy_piece", recorder)
    return recorder


def odd_entries(seed: int = 0) -> dict[str, Collected]:
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((301, 257))  # 619 KiB, odd shape: pieces end mid-row
    return {
        "big": ArrayLeaf(big, "ndarray"),
        "transposed": ArrayLeaf(rng.standard_normal((123, 517)).T, "ndarray"),  # not contiguous
        "strided": ArrayLeaf(rng.integers(0, 255, (400, 999), dtype=np.uint8)[::3, 1::2], "ndarray"),
        "bf16": ArrayLeaf(rng.standard_normal((97, 1031)).astype(ml_dtypes.bfloat16), "ndarray"),
        "odd_bytes": ArrayLeaf(rng.integers(-128, 127, 200_003, dtype=np.int8), "ndarray"),
        "empty": ArrayLeaf(np.zeros((0, 7), np.float32), "ndarray"),
        "scalar": ArrayLeaf(np.array(3.5, np.float64), "ndarray"),
        "tiny": ArrayLeaf(np.arange(3, dtype=np.int16), "ndarray"),
    }


def staged_array(item: Collected) -> np.ndarray[Any, Any]:
    assert isinstance(item, ArrayLeaf) and isinstance(item.array, np.ndarray)
    return item.array


def assert_bit_exact(staged: dict[str, Collected], live: dict[str, Collected]) -> None:
    for path, item in live.items():
        want, got = staged_array(item), staged_array(staged[path])
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), path
        assert not np.shares_memory(got, want), f"{path} was not copied"


def test_one_save_copies_on_several_threads_at_once(monkeypatch: pytest.MonkeyPatch, small_pieces: None) -> None:
    recorder = record(monkeypatch, meet=2)  # a serial copy never gets two pieces past the barrier
    live = odd_entries()
    staging = StagingBuffer()
    staged, overflow, nbytes = staging.stage(live, 1 << 30)
    assert not overflow
    assert len(recorder.threads) >= 2
    assert threading.get_ident() not in recorder.threads or len(recorder.threads) > 2
    big = staged_array(live["big"]).nbytes
    assert recorder.pieces >= big // (64 * KiB)  # the large array was split, not copied whole
    assert staging.copy_tasks >= 2
    assert nbytes == sum(staged_array(item).nbytes for item in live.values())
    assert_bit_exact(staged, live)


@pytest.mark.parametrize("piece_bytes", [1, 7, 4 * KiB, 64 * KiB, 1 << 30])
def test_every_byte_lands_exactly_whatever_the_piece_size(monkeypatch: pytest.MonkeyPatch, piece_bytes: int) -> None:
    monkeypatch.setattr(parallel_copy, "PIECE_BYTES", piece_bytes)
    live = odd_entries(piece_bytes)
    live["odd_bytes"] = ArrayLeaf(staged_array(live["odd_bytes"])[:5003], "ndarray")  # 1-byte pieces stay few
    if piece_bytes < 4 * KiB:
        live = {k: v for k, v in live.items() if staged_array(v).nbytes < 64 * KiB}
    staged, _, _ = StagingBuffer().stage(live, 1 << 30)
    assert_bit_exact(staged, live)


def test_split_covers_every_element_once() -> None:
    src = np.arange(10 * 13, dtype=np.int32).reshape(10, 13)
    for source in (src, src.T, src[::2, 3:]):
        dest = np.zeros(source.shape, np.int32)
        pieces = parallel_copy.split(dest, source, 3 * 13 * 4)
        assert len(pieces) > 1
        for d, s in pieces:
            np.copyto(d, s)
        assert np.array_equal(dest, source)


def test_staging_is_reused_across_saves_and_the_second_copy_sees_new_bytes(
        monkeypatch: pytest.MonkeyPatch, small_pieces: None) -> None:
    staging = StagingBuffer()
    live = odd_entries(1)
    first, _, _ = staging.stage(live, 1 << 30)
    buffer = staging._buffer
    assert_bit_exact(first, live)
    staged_array(live["big"])[...] = 7.0  # the caller changes its arrays after save returned
    assert staged_array(first["big"]).max() != 7.0
    recorder = record(monkeypatch)
    second, _, _ = staging.stage(live, 1 << 30)
    assert staging._buffer is buffer  # no new allocation
    assert np.shares_memory(staged_array(second["big"]), buffer)
    assert recorder.pieces > 1
    assert_bit_exact(second, live)


def test_the_budget_still_bounds_the_staging(monkeypatch: pytest.MonkeyPatch, small_pieces: None) -> None:
    recorder = record(monkeypatch)
    live = odd_entries(2)
    budget = 300 * KiB  # "big" (619 KiB) does not fit
    staging = StagingBuffer()
    staged, overflow, nbytes = staging.stage(live, budget)
    assert "big" in overflow and staged["big"] is live["big"]
    assert staging.capacity <= budget and nbytes <= budget
    assert recorder.pieces >= 2
    assert_bit_exact({k: v for k, v in staged.items() if k not in overflow},
                     {k: v for k, v in live.items() if k not in overflow})


def test_a_failed_piece_fails_the_stage_after_every_other_piece_finished(
        monkeypatch: pytest.MonkeyPatch, small_pieces: None) -> None:
    recorder = record(monkeypatch, fail_at=3)
    live = odd_entries(3)
    with pytest.raises(OSError, match="piece 3 failed"):
        StagingBuffer().stage(live, 1 << 30)
    finished = recorder.finished
    total = sum(len(parallel_copy.split(staged_array(v), staged_array(v), 64 * KiB)) for v in live.values())
    assert recorder.pieces == total and finished == total - 1  # raised only once no piece still writes


def test_an_async_save_of_every_leaf_kind_is_bit_exact_and_a_failed_copy_fails_it_cleanly(
        monkeypatch: pytest.MonkeyPatch, small_pieces: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    values: dict[str, Any] = {"np": rng.standard_normal((131, 517)),
              "torch": torch.from_numpy(rng.standard_normal((77, 301)).astype(np.float32)),
              "torch_bf16": torch.randn(129, 257, dtype=torch.bfloat16),
              "jax": jnp.asarray(rng.standard_normal((211, 97)).astype(np.float32)),
              "jax_bf16": jnp.asarray(rng.standard_normal((64, 1001)), dtype=jnp.bfloat16)}
    want = {k: np.array(v.float().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)  # copies
            for k, v in values.items()}
    recorder = record(monkeypatch, fail_at=2)
    ckpt = Checkpoint(**values)
    with pytest.raises(OSError, match="piece 2 failed"):
        ckpt.save(tmp_path / "bad", options=ASYNC)
    ckpt.sync()
    assert not list(tmp_path.glob("bad*.index"))  # nothing committed
    recorder = record(monkeypatch)
    path = ckpt.save(tmp_path / "good", options=ASYNC)
    for value in values.values():  # the caller may change or drop its arrays once save returned
        if isinstance(value, np.ndarray):
            value[...] = 0
        elif isinstance(value, torch.Tensor):
            value.zero_()
    ckpt.sync()
    assert recorder.pieces > len(values) and len(recorder.threads) >= 1
    names = dict(list_variables(path))
    for key, expected in want.items():
        assert key in names
        loaded = load_variable(path, key)
        got = np.array(loaded.float().numpy() if isinstance(loaded, torch.Tensor) else loaded, dtype=np.float64)
        assert np.array_equal(got, expected), key


FORKED = """
import os, signal, sys, time
import numpy as np
from cloudckpt.saving import parallel_copy
parallel_copy.PIECE_BYTES = 1 << 16
a = np.arange(1 << 18)
parallel_copy.copy_all([(np.empty_like(a), a)])  # the parent's pool is running
pid = os.fork()
if pid == 0:
    d = np.empty_like(a)
    tasks = parallel_copy.copy_all([(d, a)])
    os._exit(0 if tasks > 1 and np.array_equal(d, a) else 3)
for _ in range(300):  # bounded: a child stuck on an inherited pool is killed, not left behind
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.1)
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
sys.exit("the forked child never finished its copy")
"""


def test_a_forked_child_copies_on_a_pool_of_its_own() -> None:
    # a child inheriting the parent's pool object would queue its pieces for threads it does not have
    done = subprocess.run([sys.executable, "-c", FORKED], timeout=60, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
