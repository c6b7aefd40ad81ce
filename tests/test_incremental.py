"""Incremental checkpoints (issue 15): unchanged bytes are referenced, never uploaded again - and
never deleted while a committed index names them.

Bytes uploaded are counted at the storage layer (``Storage.put`` of data objects), on local disk,
SeaweedFS and fake-gcs-server (the ``root`` fixture).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import storage_of

from cloudckpt import Checkpoint, CheckpointManager, ConcurrentWriterError, Variable
from cloudckpt.errors import CheckpointNotFoundError, NotFoundError
from cloudckpt.format import FORMAT_VERSION, ArrayEntry, index_key
from cloudckpt.format.index_fetch import load_index
from cloudckpt.manager.cleanup import find_leftovers
from cloudckpt.storage import Storage, join_url
from cloudckpt.storage.base import MiB
from cloudckpt.storage.checksum import crc32c_of


class UploadCounter:
    """Bytes and keys of every data object PUT, whatever the backend (patched on ``Storage.put``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        self.keys: list[str] = []
        self._lock = threading.Lock()
        real = Storage.put

        def put(storage: Storage, key: str, data: Any, **kwargs: Any) -> Any:
            if ".data-" in key:
                size = sum(memoryview(b).nbytes for b in data) if isinstance(data, list) else memoryview(data).nbytes
                with self._lock:
                    self.bytes += size
                    self.keys.append(key)
            return real(storage, key, data, **kwargs)

        monkeypatch.setattr(Storage, "put", put)

    def take(self) -> int:
        with self._lock:
            done, self.bytes = self.bytes, 0
            return done


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> Iterator[UploadCounter]:
    yield UploadCounter(monkeypatch)


def _fine_tuned_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A frozen base (~90 % of the parameters) and a trainable head with Adam over it."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 28))
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, 256)).square().mean()
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def _leaves(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    """The bytes of every tensor leaf as the checkpoint stores it (to know what changed)."""
    out = {f"model/{k}": v.detach().numpy().tobytes() for k, v in model.state_dict().items()}
    for pid, state in optimizer.state_dict()["state"].items():
        out.update({f"optimizer/state/{pid}/{k}": v.numpy().tobytes() for k, v in state.items()})
    return out


def test_fine_tuning_uploads_only_what_changed(root: str, uploads: UploadCounter) -> None:
    """10 saves, max_to_keep=2: every save after the first uploads exactly the changed bytes,
    and every kept checkpoint restores bit-exact after each eviction."""
    model, optimizer = _fine_tuned_model()
    step = Variable(0)
    manager = CheckpointManager(Checkpoint(model=model, optimizer=optimizer, step=step), root, max_to_keep=2)
    frozen = sum(p.numel() * 4 for p in model[0].parameters())
    snapshots: dict[str, dict[str, bytes]] = {}
    previous: dict[str, bytes] | None = None
    for n in range(1, 11):
        _train_step(model, optimizer)
        step.assign(n)
        path = manager.save()
        assert path is not None
        now = _leaves(model, optimizer)
        uploaded = uploads.take()
        small = 8 * 2  # save_counter and step: int64 scalars that change every save
        if previous is None:
            assert uploaded >= sum(len(b) for b in now.values())
        else:
            changed = sum(len(b) for k, b in now.items() if previous.get(k) != b)
            assert uploaded == changed + small, f"save {n}: uploaded {uploaded}, changed {changed + small}"
            assert uploaded < frozen / 2  # the frozen base (90 % of the parameters) never goes up again
            stats = manager.checkpoint.last_save_stats
            assert stats is not None and stats.reused_bytes >= frozen
        previous = now
        snapshots[path] = now
        for kept in manager.checkpoints:  # everything still kept restores exactly, after this eviction
            fresh_model, fresh_opt = _fine_tuned_model(seed=1)
            _train_step(fresh_model, fresh_opt)  # so the optimizer has state to restore into
            Checkpoint(model=fresh_model, optimizer=fresh_opt, step=Variable(0)).restore(kept).assert_consumed()
            assert _leaves(fresh_model, fresh_opt) == snapshots[kept], kept
    storage = storage_of(root)
    index = load_index(storage, "ckpt-10")
    assert index.version == FORMAT_VERSION and "ckpt-1" in index.references
    assert not find_leftovers(storage, min_age=__import__("datetime").timedelta(0))


def _crc_twin(data: bytes) -> bytes:
    """Different bytes with the same CRC32C (CRC is affine over GF(2): flip a kernel combination of bits)."""
    base = crc32c_of([data])
    flips: list[tuple[int, int]] = []  # (delta crc, bitmask of which flips) - Gaussian elimination
    for bit in range(40):
        changed = bytearray(data)
        changed[bit // 8] ^= 1 << (bit % 8)
        delta, mask = crc32c_of([bytes(changed)]) ^ base, 1 << bit
        for pivot_delta, pivot_mask in flips:
            if delta ^ pivot_delta < delta:
                delta, mask = delta ^ pivot_delta, mask ^ pivot_mask
        if delta == 0:
            twin = bytearray(data)
            for b in range(40):
                if mask >> b & 1:
                    twin[b // 8] ^= 1 << (b % 8)
            return bytes(twin)
        flips.append((delta, mask))
        flips.sort(reverse=True)
    raise AssertionError("no CRC twin found in 40 bit flips")


def test_a_changed_array_with_the_same_crc32c_is_still_uploaded(tmp_path: Path, uploads: UploadCounter) -> None:
    original = np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8)
    twin = np.frombuffer(_crc_twin(original.tobytes()), dtype=np.uint8).copy()
    assert crc32c_of([twin.tobytes()]) == crc32c_of([original.tobytes()]) and not np.array_equal(twin, original)
    live = original.copy()
    manager = CheckpointManager(Checkpoint(a=live), tmp_path, max_to_keep=3)
    manager.save()
    uploads.take()
    np.copyto(live, twin)
    manager.save()
    assert uploads.take() >= twin.nbytes  # same CRC32C, different XXH3-128: uploaded again
    restored = np.zeros_like(twin)
    Checkpoint(a=restored).restore(join_url(str(tmp_path), "ckpt-2")).expect_partial()
    np.testing.assert_array_equal(restored, twin)


def test_incremental_can_be_turned_off(tmp_path: Path, uploads: UploadCounter) -> None:
    state = np.arange(100_000.0)
    manager = CheckpointManager(Checkpoint(s=state), tmp_path, max_to_keep=3, incremental=False)
    manager.save()
    manager.save()
    assert uploads.take() >= 2 * state.nbytes
    on = CheckpointManager(Checkpoint(s=state), tmp_path / "on", max_to_keep=3)
    on.save()
    on.save(incremental=False)
    assert uploads.take() >= 2 * state.nbytes
    on.save()
    assert uploads.take() < 1024


def test_a_plain_checkpoint_save_writes_everything(tmp_path: Path, uploads: UploadCounter) -> None:
    ckpt = Checkpoint(s=np.arange(50_000.0))
    ckpt.save(tmp_path / "c")
    ckpt.save(tmp_path / "c")
    assert uploads.take() >= 2 * 400_000  # no manager, no retention to keep referenced bytes alive
    assert not load_index(storage_of(str(tmp_path)), "c-2").references


def test_only_managed_saves_pay_for_content_hashes(tmp_path: Path) -> None:
    """A plain write/save records no hash (no manager bases a save on it: the XXH3 pass is ~8 %
    of a local save); a manager's full and incremental saves record one for every chunk."""
    state = {"a": np.arange(10_000.0), "b": np.ones(5_000, dtype=np.float32)}

    def hashes(directory: Path, name: str) -> list[str | None]:
        index = load_index(storage_of(str(directory)), name)
        return [c.hash for e in index.entries.values() if isinstance(e, ArrayEntry) for c in e.chunks]

    plain = Checkpoint(**state)
    plain.write(tmp_path / "w")
    plain.save(tmp_path / "s")
    assert hashes(tmp_path, "w") == hashes(tmp_path, "s-1") == [None] * 3  # a, b and save_counter
    manager = CheckpointManager(Checkpoint(**state), tmp_path / "m", max_to_keep=3)
    manager.save(incremental=False)
    manager.save()
    for name in ("ckpt-1", "ckpt-2"):
        assert all(h is not None and h.startswith("xxh3_128:") for h in hashes(tmp_path / "m", name))


def test_the_zombies_rollback_keeps_the_new_owners_referenced_objects(tmp_path: Path) -> None:
    frozen, head = np.arange(200_000.0), np.zeros(10)
    zombie = CheckpointManager(Checkpoint(frozen=frozen, head=head), tmp_path, max_to_keep=2)
    zombie.save()
    head += 1
    zombie.save()  # ckpt-2 references ckpt-1's frozen bytes
    newer = CheckpointManager(Checkpoint(frozen=frozen, head=head), tmp_path, max_to_keep=2)
    head += 1
    newer.save(checkpoint_number=3)  # claims the directory; references ckpt-1 too
    head += 1
    with pytest.raises(ConcurrentWriterError):
        zombie.save(checkpoint_number=4)  # commits, loses the state-file CAS, rolls back
    storage = storage_of(str(tmp_path))
    assert not storage.exists(index_key("ckpt-4"))
    for name in ("ckpt-2", "ckpt-3"):
        index = load_index(storage, name)
        missing = [o.name for o in index.objects if not storage.exists(o.name)]
        assert not missing, f"{name} lost {missing}"
    restored = {"frozen": np.zeros_like(frozen), "head": np.zeros(10)}
    Checkpoint(**restored).restore(join_url(str(tmp_path), "ckpt-3")).assert_consumed()
    np.testing.assert_array_equal(restored["frozen"], frozen)
    assert restored["head"].tolist() == [2.0] * 10  # what the newer owner saved as ckpt-3


def test_an_object_deleted_by_hand_is_named_with_its_referencing_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(Checkpoint(a=np.arange(1000.0), b=np.zeros(3)), tmp_path, max_to_keep=None)
    manager.save()
    manager.checkpoint.b[:] = 1  # type: ignore[attr-defined]
    manager.save()
    storage = storage_of(str(tmp_path))
    owned_by_first = [o.name for o in load_index(storage, "ckpt-2").objects if o.name.startswith("ckpt-1.")]
    assert owned_by_first
    storage.delete(owned_by_first)
    with pytest.raises(NotFoundError) as info:
        Checkpoint(a=np.zeros(1000), b=np.zeros(3)).restore(join_url(str(tmp_path), "ckpt-2"))
    assert isinstance(info.value, CheckpointNotFoundError)
    assert owned_by_first[0] in str(info.value) and "ckpt-2" in str(info.value)


def test_version_1_checkpoints_restore_and_are_never_reused(tmp_path: Path, uploads: UploadCounter) -> None:
    state = {"w": np.arange(10_000.0)}
    manager = CheckpointManager(Checkpoint(s=state), tmp_path, max_to_keep=None)
    manager.save()
    doc = json.loads((tmp_path / "ckpt-1.index").read_text())
    doc["version"] = 1
    for entry in doc["entries"].values():
        for chunk in entry.get("chunks", ()):
            del chunk["hash"]  # what a version-1 writer stored
    doc.pop("references", None)
    (tmp_path / "ckpt-1.index").write_text(json.dumps(doc))
    target = {"w": np.zeros(10_000)}
    Checkpoint(s=target).restore(join_url(str(tmp_path), "ckpt-1")).assert_consumed()
    np.testing.assert_array_equal(target["w"], state["w"])
    uploads.take()
    CheckpointManager(Checkpoint(s=state), tmp_path, max_to_keep=None).save()
    assert uploads.take() >= state["w"].nbytes  # no hash in the base: nothing reused


def test_gc_and_leftovers_never_touch_referenced_objects(tmp_path: Path) -> None:
    from datetime import timedelta

    frozen = np.arange(300_000.0)
    head = np.zeros(16)
    manager = CheckpointManager(Checkpoint(frozen=frozen, head=head), tmp_path, max_to_keep=1,
                                leftover_min_age=0)
    for _ in range(4):
        head += 1
        manager.save()  # ckpt-1..3 evicted; ckpt-4 still names ckpt-1's frozen bytes
    storage = storage_of(str(tmp_path))
    assert not storage.exists(index_key("ckpt-1"))
    assert not find_leftovers(storage, min_age=timedelta(0))
    restored = {"frozen": np.zeros_like(frozen), "head": np.zeros(16)}
    Checkpoint(**restored).restore(join_url(str(tmp_path), "ckpt-4")).assert_consumed()
    np.testing.assert_array_equal(restored["frozen"], frozen)
    second = CheckpointManager(Checkpoint(frozen=frozen, head=head), tmp_path, max_to_keep=1, leftover_min_age=0)
    head += 1
    second.save(checkpoint_number=5)  # its claim runs the leftovers cleanup: nothing referenced is removed
    Checkpoint(**restored).restore(join_url(str(tmp_path), "ckpt-5")).assert_consumed()
    np.testing.assert_array_equal(restored["frozen"], frozen)


def test_large_unchanged_state_costs_one_small_upload(tmp_path: Path, uploads: UploadCounter) -> None:
    state = {"big": np.ones(8 * MiB // 8), "step": Variable(0)}
    manager = CheckpointManager(Checkpoint(s=state), tmp_path, max_to_keep=2)
    manager.save()
    uploads.take()
    for n in range(1, 4):
        state["step"].assign(n)  # type: ignore[attr-defined]
        manager.save()
        assert uploads.take() == 16  # the step and save_counter, nothing else


def _cli(*args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cloudckpt", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_cli_shows_shares_copies_and_verifies_incremental_checkpoints(tmp_path: Path) -> None:
    frozen, head = np.arange(100_000.0), np.zeros(8)
    run = tmp_path / "run"
    manager = CheckpointManager(Checkpoint(frozen=frozen, head=head), run, max_to_keep=None)
    for _ in range(3):
        head += 1
        manager.save()
    shown = json.loads(_cli("inspect", str(run / "ckpt-3"), "--json").stdout)
    assert shown["new_bytes"] < 1024 and shown["shared_bytes"] == {"ckpt-1": frozen.nbytes}
    listed = {r["name"]: r for r in json.loads(_cli("ls", str(run), "--json").stdout)["checkpoints"]}
    assert listed["ckpt-1"]["shared_bytes"] == {} and listed["ckpt-3"]["shared_bytes"] == {"ckpt-1": frozen.nbytes}
    assert _cli("verify", str(run)).returncode == 0
    # One checkpoint under a new name stands alone: its copy names no other checkpoint.
    single = tmp_path / "single"
    assert _cli("cp", str(run / "ckpt-3"), str(single / "final")).returncode == 0
    copied = load_index(storage_of(str(single)), "final")
    assert not copied.references and all(o.name.startswith("final.") for o in copied.objects)
    # A directory copy keeps the chain (and copies each shared object once).
    whole = tmp_path / "whole"
    assert _cli("cp", str(run), str(whole)).returncode == 0
    import shutil

    shutil.rmtree(run)
    for directory, name in ((single, "final"), (whole, "ckpt-3"), (whole, "ckpt-1")):
        restored = {"frozen": np.zeros_like(frozen), "head": np.zeros(8)}
        Checkpoint(**restored).read(join_url(str(directory), name)).expect_partial()
        np.testing.assert_array_equal(restored["frozen"], frozen)
    assert _cli("verify", str(whole)).returncode == 0
