"""CheckpointOptions: TensorFlow's names, validation at construction, callbacks."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from cloudckpt import Checkpoint, CheckpointOptions, SaveError, Variable
from cloudckpt.options import DeviceSpec


def test_defaults_and_slots() -> None:
    options = CheckpointOptions()
    assert options.experimental_io_device is None
    assert options.enable_async is False and options.experimental_enable_async_checkpoint is False
    assert options.experimental_write_callbacks == ()
    with pytest.raises(AttributeError):
        options.typo = 1  # type: ignore[attr-defined]


def test_deprecated_async_flag_warns_and_enables() -> None:
    with pytest.warns(DeprecationWarning, match="enable_async"):
        options = CheckpointOptions(experimental_enable_async_checkpoint=True)
    assert options.enable_async and options.experimental_enable_async_checkpoint
    assert CheckpointOptions(enable_async=True).experimental_enable_async_checkpoint


@pytest.mark.parametrize(("text", "expected"), [
    ("/job:localhost", DeviceSpec(job="localhost")),
    ("/job:worker/replica:0/task:1", DeviceSpec(job="worker", replica=0, task=1)),
    ("/job:worker/task:3/device:CPU:0", DeviceSpec(job="worker", task=3, device_type="CPU", device_index="0")),
    ("/job:ps/replica:1/task:0/cpu:0", DeviceSpec(job="ps", replica=1, task=0, device_type="CPU", device_index="0")),
    ("CPU:0", DeviceSpec(device_type="CPU", device_index="0")),
])
def test_io_device_strings(text: str, expected: DeviceSpec) -> None:
    assert CheckpointOptions(experimental_io_device=text).io_device_spec == expected


@pytest.mark.parametrize("text", ["", "/", "localhost", "/job:", "/job:a/job:b", "/task:x", "/job:a//task:1",
                                  "/replica:-1"])
def test_bad_io_device_strings(text: str) -> None:
    with pytest.raises(ValueError, match="experimental_io_device"):
        CheckpointOptions(experimental_io_device=text)


def test_callback_arity_checked_at_construction() -> None:
    def two(a: str, b: str) -> None: ...

    def kw_only(*, path: str) -> None: ...

    for bad in (two, kw_only):
        with pytest.raises(TypeError, match="zero arguments or one"):
            CheckpointOptions(experimental_write_callbacks=[bad])
    with pytest.raises(TypeError, match="callables"):
        CheckpointOptions(experimental_write_callbacks=[3])  # type: ignore[list-item]
    CheckpointOptions(experimental_write_callbacks=[lambda: None, lambda p: None, print,
                                                    functools.partial(two, "x")])


def test_callbacks_run_in_order_with_save_path(tmp_path: Path) -> None:
    calls: list[tuple[str, ...]] = []
    callbacks = [lambda: calls.append(("zero",)), lambda path: calls.append(("one", path)),
                 lambda *args: calls.append(("var", *args))]
    original = list(callbacks)
    options = CheckpointOptions(experimental_write_callbacks=callbacks)
    callbacks.append(lambda: calls.append(("late",)))  # the options took a copy
    path = Checkpoint(v=Variable(1.0)).save(tmp_path / "c", options=options)
    assert calls == [("zero",), ("one", path), ("var", path)]
    assert callbacks[:3] == original
    assert (tmp_path / "c-1.index").exists()


def test_failing_callback_does_not_undo_commit(tmp_path: Path) -> None:
    calls: list[str] = []

    def boom() -> None:
        raise RuntimeError("callback broke")

    options = CheckpointOptions(experimental_write_callbacks=[boom, lambda: calls.append("after")])
    ckpt = Checkpoint(v=Variable(np.ones(2)))
    with pytest.raises(SaveError, match="callback broke") as info:
        ckpt.save(tmp_path / "c", options=options)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert calls == ["after"]
    assert (tmp_path / "c-1.index").exists()
    assert "c-1" in (tmp_path / "checkpoint").read_text()  # bookkeeping ran before the callbacks


def test_staging_budget_validated() -> None:
    with pytest.raises(ValueError, match="async_staging_budget"):
        CheckpointOptions(async_staging_budget=-1)
