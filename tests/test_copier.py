"""The device-tensor pipeline (issue 24), run with the CPU copier: CPU tensors stand in for CUDA ones.

``use_copier(copier, cpu_tensors=True)`` routes every torch tensor through the path a CUDA
tensor takes (a ``DeviceArray``, its copier's batches, the staging area, the sync ring, the
restore's bounce buffers). ``Recording`` is an instrumented ``ThreadCopier``: it counts the
batches and host allocations, fills what it allocates with garbage (a read before the copy
would see it), and can delay every copy (an upload that did not wait for it would store
garbage). What runs on a GPU only - pinned memory, streams, events - is not tested here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

import cloudckpt
from cloudckpt.adapters import torch_device
from cloudckpt.adapters.torch_device import use_copier
from cloudckpt.dcp import StorageReader, StorageWriter
from cloudckpt.format import ArrayEntry
from cloudckpt.format.index_fetch import read_index
from cloudckpt.leaves.copier import CopierChoice, DeviceArray, HostBytes, Pending, ThreadCopier
from cloudckpt.object_graph import ArrayLeaf, collect
from cloudckpt.restoring import device_reads
from cloudckpt.restoring.array_reads import read_coalesced
from cloudckpt.restoring.assign import RestoreSession
from cloudckpt.saving import objects
from cloudckpt.storage import ReadRequest, Storage, open_storage

KiB = 1024


class Recording(ThreadCopier):
    """A CPU copier that records what the pipeline asked of it."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.allocations: list[int] = []
        self.to_host_batches: list[int] = []
        self.to_device_batches: list[int] = []
        self.pins = 0
        self.completed = 0
        self._count = threading.Lock()

    def allocate_host(self, nbytes: int) -> HostBytes:
        self.allocations.append(nbytes)
        return np.full(nbytes, 0xAB, dtype=np.uint8)

    def pin(self, buffer: HostBytes) -> None:
        self.pins += 1

    def to_host(self, batch: Sequence[tuple[DeviceArray, HostBytes]]) -> Pending:
        items = list(batch)
        self.to_host_batches.append(len(items))

        def run() -> None:
            time.sleep(self.delay)
            for array, dest in items:
                array.copy_to_host(dest)
            with self._count:
                self.completed += 1
        return self._submit(run)

    def to_device(self, batch: Sequence[tuple[HostBytes, DeviceArray, tuple[int, int]]]) -> Pending:
        self.to_device_batches.append(len(batch))
        return super().to_device(batch)


@pytest.fixture
def copier() -> Iterator[Recording]:
    recording = Recording()
    with use_copier(recording, cpu_tensors=True):
        yield recording


def _bits(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes (C order), so NaN payloads and -0.0 compare too."""
    plain = tensor.detach().contiguous().reshape(-1)
    return plain.view(torch.uint8).numpy().tobytes() if plain.numel() else b""


def _zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _plain_restore(path: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Restore outside the device path (plain host reads): an independent check of what was stored."""
    with use_copier(ThreadCopier(), cpu_tensors=False):
        dest = _zeros_like(like)
        cloudckpt.Checkpoint(model=dest).restore(path)
    return dest


def _many(n: int, rows: int = 8, cols: int = 1024) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {f"t{i}": torch.randn(rows, cols, generator=g) for i in range(n)}


def test_without_the_seam_a_cpu_tensor_is_a_host_view_and_the_cpu_copier_is_chosen_and_logged(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    tensor = torch.arange(6.0)
    leaf = collect(cloudckpt.Checkpoint(t=tensor))["t"]
    assert isinstance(leaf, ArrayLeaf) and isinstance(leaf.array, np.ndarray)
    assert leaf.array.ctypes.data == tensor.data_ptr()  # zero copy, as before
    monkeypatch.setattr(torch_device, "_selection", CopierChoice(torch_device._first_choice))  # not chosen yet
    with caplog.at_level(logging.INFO, logger="cloudckpt.adapters.torch_device"):
        chosen = torch_device.chosen_copier()
    assert chosen.name == "cpu" and not torch.cuda.is_available()
    assert "cpu copier" in caplog.text


def test_sync_save_streams_device_pieces_through_a_bounded_ring(copier: Recording, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects, "TARGET_OBJECT_SIZE", 64 * KiB)
    state = _many(48)  # 48 x 32 KiB = 1.5 MiB in ~24 data objects
    total = sum(t.nbytes for t in state.values())
    path = cloudckpt.Checkpoint(model=state).write(str(tmp_path / "ck"))
    sizes = [p.stat().st_size for p in tmp_path.iterdir() if ".data-" in p.name]
    assert len(sizes) > objects.RING_SLOTS
    assert 0 < len(copier.allocations) <= objects.RING_SLOTS  # buffers made once, then reused
    assert sum(copier.allocations) <= objects.RING_SLOTS * max(sizes) < total  # the ring's, not the state's
    assert sum(copier.to_host_batches) == len(state)  # every tensor copied once ...
    assert len(copier.to_host_batches) < len(state)  # ... in batches of a data object's pieces
    restored = _plain_restore(path, state)
    assert all(_bits(restored[k]) == _bits(v) for k, v in state.items())


def test_no_byte_is_checksummed_or_uploaded_before_its_copy_completed(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow copies into garbage-filled, reused ring buffers: any read before the event stores wrong bytes."""
    monkeypatch.setattr(objects, "TARGET_OBJECT_SIZE", 64 * KiB)
    slow = Recording(delay=0.02)
    state = _many(16)
    with use_copier(slow, cpu_tensors=True):
        path = cloudckpt.Checkpoint(model=state).write(str(tmp_path / "ck"))
    assert slow.completed == len(slow.to_host_batches) > 1
    restored = _plain_restore(path, state)
    assert all(_bits(restored[k]) == _bits(v) for k, v in state.items())


def test_async_save_copies_in_one_batch_blocks_until_it_completed_and_reuses_the_staging(tmp_path: Path) -> None:
    slow = Recording(delay=0.1)
    state = _many(40, rows=4)
    with use_copier(slow, cpu_tensors=True):
        ckpt = cloudckpt.Checkpoint(model=state)
        options = cloudckpt.CheckpointOptions(enable_async=True)
        first = ckpt.save(str(tmp_path / "ck"), options=options)
        assert slow.completed == 1  # the caller returned only once the batch's copies were done
        assert ckpt._saver is not None
        staging = ckpt._saver.staging
        address, capacity = staging._buffer.ctypes.data, staging.capacity  # type: ignore[union-attr]
        original = {k: v.clone() for k, v in state.items()}
        for v in state.values():
            v.add_(1.0)  # training goes on: the staged bytes must be the snapshot's
        ckpt.sync()
        second = ckpt.save(str(tmp_path / "ck"), options=options)
        ckpt.sync()
        assert staging._buffer.ctypes.data == address and staging.capacity == capacity  # type: ignore[union-attr]
        ckpt.close()
    assert slow.to_host_batches == [len(state), len(state)]  # one batch per save, not one per tensor
    assert slow.pins == 1 and slow.allocations == []  # the staging area: pinned once, never reallocated
    assert all(_bits(_plain_restore(first, state)[k]) == _bits(original[k]) for k in state)
    assert all(_bits(_plain_restore(second, state)[k]) == _bits(state[k]) for k in state)


def _odd_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(64, 48, generator=g)
    raw = torch.randint(0, 256, (300,), dtype=torch.uint8, generator=g)
    raw[:2] = torch.tensor([0x7F, 0xFF], dtype=torch.uint8)  # NaN payloads must survive bit for bit
    return {
        "bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "fp8": raw.view(torch.float8_e4m3fn),
        "f16": raw[:200].view(torch.float16).reshape(10, 10),
        "transposed": base.t(),
        "strided": base[::3, 1::2],
        "base": base,
        "tied": base,  # the same tensor twice (tied weights)
        "rows": base[5:20],  # a view inside it
        "scalar": torch.tensor(-0.0),
        "empty": torch.zeros(0, 5),
        "flag": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_dtypes_noncontiguous_and_shared_storage_round_trip_bit_exact(copier: Recording, tmp_path: Path,
                                                                      asynchronous: bool) -> None:
    state = _odd_state()
    ckpt = cloudckpt.Checkpoint(model=state)
    path = ckpt.save(str(tmp_path / "ck"), options=cloudckpt.CheckpointOptions(enable_async=asynchronous))
    ckpt.close()
    if asynchronous:  # base, tied and rows share one storage: staged once
        shared = state["base"].nbytes
        others = sum(v.nbytes for k, v in state.items() if k not in ("base", "tied", "rows"))
        stats = ckpt.last_save_stats
        assert stats is not None and stats.staged_bytes <= shared + others + 8  # + the save counter
    dest = {k: (torch.zeros(64, 48).t() if k == "transposed" else torch.zeros_like(v)) for k, v in state.items()}
    cloudckpt.Checkpoint(model=dest).restore(path)  # through the bounce buffers too
    assert copier.to_device_batches
    for key, value in state.items():
        assert dest[key].dtype == value.dtype and dest[key].shape == value.shape, key
        assert _bits(dest[key]) == _bits(value), key
    assert not dest["transposed"].is_contiguous()  # restored in place, not replaced


def test_restore_streams_through_bounce_buffers_and_verifies_every_block(copier: Recording, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_reads, "BOUNCE_BYTES", 4 * KiB)
    g = torch.Generator().manual_seed(3)
    state = {"big": torch.randn(64, 1024, generator=g), "small": torch.randn(3, generator=g)}  # 256 KiB + 12 B
    with use_copier(ThreadCopier(), cpu_tensors=False):
        path = cloudckpt.Checkpoint(model=state).write(str(tmp_path / "ck"))
    dest = _zeros_like(state)
    cloudckpt.Checkpoint(model=dest).restore(path)
    assert all(_bits(dest[k]) == _bits(v) for k, v in state.items())
    assert sum(copier.to_device_batches) == 64 + 1  # one block per 4 KiB row, and the small one
    assert len(copier.allocations) <= device_reads.BOUNCE_SLOTS  # a bounded ring, reused
    assert max(copier.allocations) <= 4 * KiB
    data = next(p for p in (tmp_path).iterdir() if ".data-" in p.name)
    raw = bytearray(data.read_bytes())
    raw[100 * KiB] ^= 0xFF  # one flipped bit in a block of "big"
    data.write_bytes(bytes(raw))
    with pytest.raises(cloudckpt.errors.ChecksumError, match="big"):
        cloudckpt.Checkpoint(model=_zeros_like(state)).restore(path)


def test_dcp_save_hands_device_tensors_to_the_copier(copier: Recording, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects, "TARGET_OBJECT_SIZE", 64 * KiB)
    state: dict[str, Any] = {**_many(12), "bf16": torch.randn(16, 16).to(torch.bfloat16)}
    dcp_save(state, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    assert sum(copier.to_host_batches) == len(state) and len(copier.to_host_batches) < len(state)
    assert len(copier.allocations) <= objects.RING_SLOTS
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    with use_copier(ThreadCopier(), cpu_tensors=False):
        dcp_load(dest, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    assert all(_bits(dest[k]) == _bits(v) for k, v in state.items())


def test_dcp_load_restores_device_tensors_through_bounce_buffers(copier: Recording, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP's ``StorageReader`` fills device destinations as ``Checkpoint`` restores do: rounds of bounce
    reads the copier copies in (``restoring/device_reads``), not a host buffer per tensor and ``copy_``."""
    monkeypatch.setattr(device_reads, "BOUNCE_BYTES", 8 * KiB)
    state: dict[str, Any] = {**_many(3, rows=16), "bf16": torch.randn(16, 16).to(torch.bfloat16),
                             "scalar": torch.tensor(-0.0)}
    with use_copier(ThreadCopier(), cpu_tensors=False):
        dcp_save(state, storage_writer=StorageWriter(tmp_path / "ck"), no_dist=True)
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp_load(dest, storage_reader=StorageReader(tmp_path / "ck"), no_dist=True)
    assert all(_bits(dest[k]) == _bits(v) for k, v in state.items())
    assert sum(copier.to_device_batches) == 3 * 8 + 1 + 1  # 64 KiB tensors in 8 KiB row blocks, bf16, scalar
    assert max(copier.allocations) <= 8 * KiB  # bounce buffers only: no host buffer of a 64 KiB tensor


class CountingRelay:
    """A ``RangeReader`` standing in for the io host's relay, where every call is a collective."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, storage: Storage, requests: Sequence[ReadRequest]) -> None:
        self.calls += 1
        read_coalesced(storage, requests)


def test_a_relayed_restore_reads_device_tensors_in_its_one_collective_read(copier: Recording, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the io host every rank must pass each collective once: no rounds of bounce reads there."""
    monkeypatch.setattr(device_reads, "BOUNCE_BYTES", 4 * KiB)
    state = _many(3, rows=16)  # 64 KiB each: 16 bounce blocks each outside a relay
    path = cloudckpt.Checkpoint(model=state).write(str(tmp_path / "ck"))
    storage = open_storage(str(tmp_path))
    index = read_index(storage, Path(path).name)
    assert index is not None
    relay = CountingRelay()
    dest = _zeros_like(state)
    RestoreSession(storage, index, relay).restore("", cloudckpt.Checkpoint(model=dest), None)
    assert relay.calls == 1
    assert copier.to_device_batches == [len(state)]  # copied in after that read, in one batch
    assert all(_bits(dest[k]) == _bits(v) for k, v in state.items())


def test_a_dtensor_local_shard_goes_through_the_copier_both_ways(copier: Recording, tmp_path: Path) -> None:
    """A one-process gloo group: the DTensor's local shard is a DeviceArray, saved in the batch and
    restored through bounce buffers into the local shard itself."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.randn(32, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        state = {"w": distribute_tensor(full, mesh, [Shard(0)]), "plain": torch.arange(10.0)}
        path = cloudckpt.Checkpoint(model=state).write(str(tmp_path / "ck"))
        assert copier.to_host_batches and sum(copier.to_host_batches) == 2  # the shard and the plain tensor
        shard = distribute_tensor(torch.zeros_like(full), mesh, [Shard(0)])
        dest = {"w": shard, "plain": torch.zeros(10)}
        local = shard.to_local()
        cloudckpt.Checkpoint(model=dest).restore(path)
        assert sum(copier.to_device_batches) == 2
        assert shard.to_local().data_ptr() == local.data_ptr()  # restored into the shard in place
        assert _bits(shard.full_tensor()) == _bits(full)
        assert _bits(dest["plain"]) == _bits(state["plain"])
    finally:
        dist.destroy_process_group()


def test_a_tensor_larger_than_an_object_streams_in_row_blocks(copier: Recording, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring holds about an object, not the largest tensor: a big device tensor becomes chunks of rows."""
    monkeypatch.setattr(objects, "TARGET_OBJECT_SIZE", 32 * KiB)
    big = torch.randn(64, 1024, generator=torch.Generator().manual_seed(9))  # 256 KiB: 8 blocks of 8 rows
    path = cloudckpt.Checkpoint(model={"big": big}).write(str(tmp_path / "ck"))
    index = read_index(open_storage(str(tmp_path)), Path(path).name)
    assert index is not None
    entry = index.entries["model/big"]
    assert isinstance(entry, ArrayEntry)
    assert [c.start for c in entry.chunks] == [(r, 0) for r in range(0, 64, 8)]
    assert max(copier.allocations) <= 2 * 32 * KiB and sum(copier.allocations) < big.nbytes
    assert _bits(_plain_restore(path, {"big": big})["big"]) == _bits(big)


def test_async_overflow_and_incremental_saves_stream_device_tensors_too(copier: Recording, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """State beyond the staging budget is uploaded through the ring before ``save`` returns; a
    manager's incremental save fingerprints device pieces through the ring and reuses the unchanged."""
    monkeypatch.setattr(objects, "TARGET_OBJECT_SIZE", 64 * KiB)
    state = _many(8)  # 8 x 32 KiB
    budget = 3 * 32 * KiB + 256  # three fit (and the save counter); five overflow
    ckpt = cloudckpt.Checkpoint(model=state)
    path = ckpt.save(str(tmp_path / "over"), options=cloudckpt.CheckpointOptions(
        enable_async=True, async_staging_budget=budget))
    ckpt.sync()
    stats = ckpt.last_save_stats
    assert stats is not None and stats.overflow_bytes >= 5 * 32 * KiB and stats.staged_bytes <= budget
    assert copier.to_host_batches[0] == 3 and sum(copier.to_host_batches) == len(state)
    assert all(_bits(_plain_restore(path, state)[k]) == _bits(v) for k, v in state.items())
    ckpt.close()

    inner = cloudckpt.Checkpoint(model=state)
    manager = cloudckpt.CheckpointManager(inner, tmp_path / "managed", max_to_keep=2)
    manager.save()
    state["t0"].add_(1.0)
    second = manager.save()
    assert second is not None
    managed = inner.last_save_stats
    assert managed is not None and managed.reused_bytes >= 6 * 32 * KiB  # unchanged device tensors not re-uploaded
    assert all(_bits(_plain_restore(second, state)[k]) == _bits(v) for k, v in state.items())


def test_a_device_tensor_the_format_cannot_store_is_refused_naming_its_key(copier: Recording, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'model/half_complex'.*complex32"):
        cloudckpt.Checkpoint(model={"half_complex": torch.zeros(3, dtype=torch.complex64).to(torch.complex32)}
                             ).write(str(tmp_path / "ck"))
    assert copier.to_host_batches == []  # refused while collecting: nothing was copied


def test_a_restore_round_is_one_copiers_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors served by two copiers (two GPUs) are never mixed in one batch: each batch's event covers its copies."""
    monkeypatch.setattr(device_reads, "BOUNCE_BYTES", 4 * KiB)
    state = {"a": torch.randn(7, 1024), "b": torch.randn(5, 1024), "c": torch.randn(8, 1024)}  # odd: rounds of 2
    path = cloudckpt.Checkpoint(model=state).write(str(tmp_path / "ck"))
    first, second = Recording(), Recording()
    dest = _zeros_like(state)
    with use_copier(first, cpu_tensors=True):
        plain = torch_device.device_array
        monkeypatch.setattr(torch_device, "device_array", lambda t: None if plain(t) is None else
                            torch_device.TorchDeviceArray(t, second if t.data_ptr() == dest["b"].data_ptr() else first))
        cloudckpt.Checkpoint(model=dest).restore(path)
    assert sum(first.to_device_batches) == 15 and sum(second.to_device_batches) == 5  # 4 KiB rows each
    assert all(_bits(dest[k]) == _bits(v) for k, v in state.items())
