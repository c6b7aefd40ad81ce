"""Leaf kinds are objects in a registry: a new kind is one class plus one ``register`` call.

The toy kind below (a wrapper around a numpy array, defined here and nowhere in the
library) goes through ``Checkpoint`` save, in-place restore, deferred restoration (the
attribute assigned after ``read``) and a fresh build inside an adapter's state - with no
change to the graph walk or the restore plan.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudckpt import Checkpoint, CheckpointMismatchError, load_variable
from cloudckpt.leaves import ArrayLeaf, Builder, LeafKind, LeafPlan, Setter, register, registered, unregister
from cloudckpt.leaves.base import array_entry, check_array, host_array, read_or_copy


class Boxed:
    """A user type the library knows nothing about: one numpy array inside."""

    def __init__(self, data: Any) -> None:
        self.data = np.array(data)


class BoxedKind(LeafKind):
    """Written as a plain numpy array (any reader can load it); restored into the box's array."""

    name = "boxed"

    def matches(self, value: object) -> bool:
        return isinstance(value, Boxed)

    def collect(self, value: Any, path: str) -> ArrayLeaf:
        return ArrayLeaf(host_array(value.data, path), "ndarray")

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        entry = array_entry(plan, live)
        check_array(plan, entry, live.data.shape, live.data.dtype)
        read_or_copy(plan, live.data, lambda dest: np.copyto(live.data, dest))

    def build_into(self, plan: LeafPlan, template: Any) -> Builder | None:
        entry = array_entry(plan, template)
        check_array(plan, entry, template.data.shape, template.data.dtype)
        dest = plan.read_new()
        return lambda: Boxed(dest)


BOXED = BoxedKind()


@pytest.fixture
def boxed_kind() -> Iterator[BoxedKind]:
    register(BOXED)
    try:
        yield BOXED
    finally:
        unregister(BOXED)


class Holder:
    """An adapted object (``state_dict``) whose state holds a box."""

    def __init__(self, box: Boxed) -> None:
        self.box = box

    def state_dict(self) -> dict[str, Any]:
        return {"box": self.box}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.box = state["box"]


def test_builtin_kinds_are_tried_in_the_classification_order() -> None:
    names = [kind.name for kind in registered()]
    assert names[:7] == ["sharded", "variable", "ndarray", "numpy_scalar", "value", "tensor", "bytes"]


def test_an_unregistered_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="was expecting box to be a trackable object"):
        Checkpoint(box=Boxed([1.0, 2.0]))


def test_a_registered_kind_saves_and_restores_in_place(tmp_path: Path, boxed_kind: BoxedKind) -> None:
    box = Boxed(np.arange(6, dtype=np.float32).reshape(2, 3))
    ckpt = Checkpoint(box=box)
    path = ckpt.write(tmp_path / "ckpt")
    entry = json.loads((tmp_path / "ckpt.index").read_text())["entries"]["box"]
    assert (entry["pytype"], entry["dtype"], entry["shape"]) == ("ndarray", "float32", [2, 3])

    memory = box.data
    box.data[...] = -1
    ckpt.read(path).assert_consumed()
    assert box.data is memory
    np.testing.assert_array_equal(box.data, np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(load_variable(path, "box"), box.data)  # a fresh build: a numpy array


def test_a_registered_kind_is_restored_when_assigned_after_the_read(tmp_path: Path, boxed_kind: BoxedKind) -> None:
    path = Checkpoint(box=Boxed([1, 2, 3])).write(tmp_path / "ckpt")
    later = Checkpoint()
    status = later.read(path)
    later.box = Boxed([0, 0, 0])
    np.testing.assert_array_equal(later.box.data, [1, 2, 3])
    status.assert_consumed()


def test_a_registered_kind_is_built_new_inside_an_adapters_state(tmp_path: Path, boxed_kind: BoxedKind) -> None:
    path = Checkpoint(holder=Holder(Boxed([[1.5, 2.5]]))).write(tmp_path / "ckpt")
    template = Boxed([[0.0, 0.0]])
    holder = Holder(template)
    Checkpoint(holder=holder).read(path).assert_consumed()
    assert holder.box is not template
    np.testing.assert_array_equal(holder.box.data, [[1.5, 2.5]])


def test_a_registered_kind_of_another_shape_is_a_mismatch(tmp_path: Path, boxed_kind: BoxedKind) -> None:
    path = Checkpoint(box=Boxed([1, 2, 3])).write(tmp_path / "ckpt")
    box = Boxed([7, 7])
    with pytest.raises(CheckpointMismatchError, match=r"'box'.*shape \(3,\).*shape \(2,\).*nothing was restored"):
        Checkpoint(box=box).read(path)
    np.testing.assert_array_equal(box.data, [7, 7])
    saved = Checkpoint(holder=Holder(Boxed([1, 2, 3]))).write(tmp_path / "held")
    template = Boxed([7, 7])
    holder = Holder(template)
    with pytest.raises(CheckpointMismatchError, match=r"'holder/box'.*nothing was restored"):
        Checkpoint(holder=holder).read(saved)
    assert holder.box is template


def test_register_takes_only_leaf_kinds() -> None:
    with pytest.raises(TypeError, match="LeafKind"):
        register(Boxed)  # type: ignore[arg-type]
