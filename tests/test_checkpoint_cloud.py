"""The key Checkpoint behaviours on every backend: local disk, SeaweedFS (S3), fake-gcs-server (GCS)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import storage_of

import cloudckpt
from cloudckpt import Checkpoint, CheckpointOptions, Variable
from cloudckpt.errors import CheckpointNotFoundError, ChecksumError
from cloudckpt.format.state_file import parse
from cloudckpt.storage import TransferConfig, open_storage, register_storage

MiB = 1024 * 1024


def test_round_trip_numpy_torch_and_values(root: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
    optimizer.step()
    state = {"w": np.random.default_rng(0).standard_normal((64, 33)).astype(ml_dtypes.bfloat16),
             "ints": np.arange(10, dtype=np.int64), "meta": {"lr": 0.1, "nan": float("nan"), 3: "three"}}
    path = Checkpoint(model=model, optimizer=optimizer, state=state, step=Variable(5)).save(f"{root}/ckpt")
    assert path == f"{root}/ckpt-1"

    model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    optimizer2 = torch.optim.Adam(model2.parameters())
    state2 = {"w": np.zeros((64, 33), ml_dtypes.bfloat16), "ints": np.zeros(10, np.int64),
              "meta": {"lr": 0.0, "nan": 0.0, 3: ""}}
    step = Variable(0)
    Checkpoint(model=model2, optimizer=optimizer2, state=state2, step=step).restore(path).assert_consumed()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert set(optimizer2.state_dict()["state"]) == {0, 1, 2, 3}
    assert state2["w"].tobytes() == state["w"].tobytes() and state2["meta"][3] == "three"
    assert int(step) == 5
    assert cloudckpt.load_variable(path, "state/ints").tolist() == list(range(10))


def test_save_numbering_and_state_file(root: str) -> None:
    ckpt = Checkpoint(v=Variable(np.ones(3)))
    ckpt.save(f"{root}/ckpt")
    last = ckpt.save(f"{root}/ckpt")
    state = parse(storage_of(root).get("checkpoint").decode(), "checkpoint")
    assert state.model_checkpoint_path == "ckpt-2" and last.endswith("ckpt-2")
    with pytest.raises(CheckpointNotFoundError, match="ckpt-2"):
        ckpt.restore(f"{root}/ckpt")


def test_rewrite_deletes_only_the_replaced_data(root: str) -> None:
    ckpt = Checkpoint(v=Variable(np.ones(3)))
    ckpt.write(f"{root}/c")
    ckpt.v.assign(np.full(3, 4.0))
    ckpt.write(f"{root}/c")
    storage = storage_of(root)
    data = [m.key for m in storage.list("c.data-")]
    assert len(data) == 1
    target = Variable(np.zeros(3))
    Checkpoint(v=target).read(f"{root}/c").assert_consumed()
    assert (target.numpy() == 4).all()


def test_corruption_is_detected(root: str) -> None:
    Checkpoint(a=np.arange(100.0)).write(f"{root}/c")
    storage = storage_of(root)
    key = storage.list("c.data-")[0].key
    raw = bytearray(storage.get(key))
    raw[-3] ^= 0x10
    storage.put(key, bytes(raw))
    with pytest.raises(ChecksumError, match=r"'a'.*c\.data-00000-of-00001"):
        Checkpoint(a=np.zeros(100)).read(f"{root}/c")


def test_async_save_and_deferred_restore(root: str) -> None:
    live = np.arange(1000.0)
    with Checkpoint(a=live, v=Variable(2)) as ckpt:
        path = ckpt.save(f"{root}/ckpt", options=CheckpointOptions(enable_async=True))
        live[:] = 0
    fresh = Checkpoint()
    status = fresh.restore(path)
    fresh.a = np.zeros(1000)
    fresh.v = Variable(0)
    status.assert_consumed()
    np.testing.assert_array_equal(fresh.a, np.arange(1000.0))
    assert int(fresh.save_counter) == 1


def test_multipart_sized_checkpoint(root: str) -> None:
    """Objects above the multipart threshold go through the backend's parallel upload."""
    register_storage(open_storage(root, config=TransferConfig(multipart_threshold=5 * MiB, part_size=5 * MiB,
                                                              read_chunk_size=3 * MiB)))
    arrays = {f"a{i}": np.random.default_rng(i).standard_normal(3 * MiB // 8 * 2) for i in range(2)}
    path = Checkpoint(arrays=arrays).write(f"{root}/big")
    target: dict[str, Any] = {k: np.zeros_like(v) for k, v in arrays.items()}
    Checkpoint(arrays=target).read(path).assert_consumed()
    for key, value in arrays.items():
        np.testing.assert_array_equal(target[key], value)
