"""PyTorch state and random generators: modules, optimizers, schedulers, tensors, RNG streams."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import cloudckpt
from cloudckpt import Checkpoint, CheckpointMismatchError


def make(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2),
                                torch.nn.BatchNorm1d(2)).to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: int,
          generator: torch.Generator, dtype: torch.dtype = torch.float32) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(6, 4, generator=generator).to(dtype)).float().square().sum().backward()
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_module_optimizer_scheduler_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    model, optimizer, scheduler = make(dtype)
    train(model, optimizer, scheduler, 3, gen, dtype)
    path = Checkpoint(model=model, optimizer=optimizer, scheduler=scheduler, gen=gen).save(tmp_path / "ckpt")

    torch.manual_seed(123)
    model2, optimizer2, scheduler2 = make(dtype)
    gen2 = torch.Generator().manual_seed(99)
    param_ref = next(model2.parameters())
    Checkpoint(model=model2, optimizer=optimizer2, scheduler=scheduler2, gen=gen2).restore(path).assert_consumed()
    assert param_ref is next(model2.parameters())
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    state, state2 = optimizer.state_dict(), optimizer2.state_dict()
    assert set(state2["state"]) == set(state["state"]) and all(isinstance(k, int) for k in state2["state"])
    for key in state["state"]:
        for name, value in state["state"][key].items():
            assert torch.equal(value, state2["state"][key][name])
    assert state2["param_groups"] == state["param_groups"]
    assert scheduler2.state_dict() == scheduler.state_dict()  # type: ignore[attr-defined]

    # Training continues identically from the restored state.
    train(model, optimizer, scheduler, 2, gen, dtype)
    train(model2, optimizer2, scheduler2, 2, gen2, dtype)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bfloat16_is_stored_faithfully(tmp_path: Path) -> None:
    tensor = torch.randn(5, 3).to(torch.bfloat16)
    path = Checkpoint(t={"x": tensor}).write(tmp_path / "c")
    reader = cloudckpt.load_checkpoint(path)
    assert str(reader.get_variable_to_dtype_map()["t/x"]) == "bfloat16"
    loaded = reader.get_tensor("t/x")
    assert isinstance(loaded, torch.Tensor) and loaded.dtype == torch.bfloat16 and torch.equal(loaded, tensor)


def test_plain_tensors_restore_in_place(tmp_path: Path) -> None:
    source = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    path = Checkpoint(tensors=source).write(tmp_path / "c")
    target = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.int64)}
    ref = target["a"]
    Checkpoint(tensors=target).read(path).assert_consumed()
    assert target["a"] is ref and torch.equal(ref, source["a"]) and torch.equal(target["b"], source["b"])
    non_contiguous = torch.zeros(3, 2).t()
    Checkpoint(tensors={"a": non_contiguous, "b": torch.zeros(4, dtype=torch.int64)}).read(path)
    assert torch.equal(non_contiguous, source["a"])


def test_module_key_mismatch_leaves_module_untouched(tmp_path: Path) -> None:
    path = Checkpoint(model=torch.nn.Linear(3, 3)).write(tmp_path / "c")
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="missing in checkpoint"):
        Checkpoint(model=other).read(path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_tensor_shape_mismatch(tmp_path: Path) -> None:
    path = Checkpoint(model=torch.nn.Linear(3, 3)).write(tmp_path / "c")
    other = torch.nn.Linear(3, 4)
    with pytest.raises(CheckpointMismatchError, match=r"'model/weight'.*\(3, 3\).*\(4, 3\)"):
        Checkpoint(model=other).read(path)


def test_random_streams_continue(tmp_path: Path) -> None:
    np_gen = np.random.default_rng(1)
    legacy = np.random.RandomState(2)
    mt = np.random.Generator(np.random.MT19937(3))
    py = random.Random(4)
    py.gauss(0, 1)  # leaves a cached gauss_next
    tg = torch.Generator().manual_seed(5)
    for _ in range(3):
        np_gen.random(), legacy.rand(), mt.random(), py.random(), torch.rand(1, generator=tg)
    path = Checkpoint(np_gen=np_gen, legacy=legacy, mt=mt, py=py, tg=tg).write(tmp_path / "c")
    expected = (np_gen.random(5), legacy.rand(5), mt.random(5), [py.gauss(0, 1) for _ in range(3)],
                torch.rand(5, generator=tg))

    np_gen2, legacy2 = np.random.default_rng(), np.random.RandomState(0)
    mt2, py2, tg2 = np.random.Generator(np.random.MT19937(0)), random.Random(), torch.Generator()
    Checkpoint(np_gen=np_gen2, legacy=legacy2, mt=mt2, py=py2, tg=tg2).read(path).assert_consumed()
    got = (np_gen2.random(5), legacy2.rand(5), mt2.random(5), [py2.gauss(0, 1) for _ in range(3)],
           torch.rand(5, generator=tg2))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


def test_generator_kind_mismatch(tmp_path: Path) -> None:
    path = Checkpoint(rng=np.random.default_rng(0)).write(tmp_path / "c")
    with pytest.raises(CheckpointMismatchError, match="numpy_generator"):
        Checkpoint(rng=random.Random()).read(path)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_tensor_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"complex32|no numpy"):
        Checkpoint(t={"x": torch.zeros(2, dtype=torch.complex32)}).write(tmp_path / "c")
