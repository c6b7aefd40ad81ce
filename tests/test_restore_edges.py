"""Restores that must fail cleanly or not at all: deep trees, sequences whose length changed, meta tensors."""

from __future__ import annotations

import warnings
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cloudckpt import Checkpoint, CheckpointMismatchError, Trackable, Variable, list_variables, load_variable
from cloudckpt.format import CheckpointIndex, NodeEntry, ValueEntry, encode_index, index_key

DEPTH = 2500  # well past what made restore raise RecursionError (about 1,000 levels)


def chain(depth: int, leaf: Any) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    node["x"] = leaf
    return root


def bottom(tree: dict[str, Any], depth: int) -> dict[str, Any]:
    for _ in range(depth):
        tree = tree["a"]
    return tree


# ---------------------------------------------------------------------- deep key trees
def test_a_deep_tree_saves_and_restores_without_recursion(tmp_path: Path) -> None:
    path = Checkpoint(d=chain(DEPTH, np.arange(3.0))).write(str(tmp_path / "c"))
    live = chain(DEPTH, np.zeros(3))
    Checkpoint(d=live).read(path).assert_consumed()
    assert bottom(live, DEPTH)["x"].tolist() == [0.0, 1.0, 2.0]
    key = "d/" + "a/" * DEPTH + "x"
    assert (key, [3]) in list_variables(path)
    loaded = load_variable(path, "d")
    assert bottom(loaded, DEPTH)["x"].tolist() == [0.0, 1.0, 2.0]


def test_a_deep_crafted_index_is_read_not_a_recursion_error(tmp_path: Path) -> None:
    """An index written by anyone (no save needed to make one): DEPTH nested dict nodes."""
    depth = DEPTH
    entries: dict[str, Any] = {"": NodeEntry("object", ("d",))}
    path = "d"
    for _ in range(depth):
        entries[path] = NodeEntry("dict", ("a",))
        path += "/a"
    entries[path] = ValueEntry("int", 7)
    (tmp_path / index_key("c")).write_bytes(encode_index(CheckpointIndex("c", entries, ())))
    assert bottom(load_variable(str(tmp_path / "c"), "d"), depth) == 7
    live: dict[str, Any] = chain(depth - 1, None)
    bottom(live, depth - 1)["a"] = 0
    Checkpoint(d=live).read(str(tmp_path / "c"))
    assert bottom(live, depth) == 7


def test_deep_trackables_save_and_restore(tmp_path: Path) -> None:
    def nest(depth: int, value: float) -> Trackable:
        root = node = Trackable()
        for _ in range(depth):
            node.child = Trackable()
            node = node.child
        node.v = Variable(value)
        return root

    path = Checkpoint(m=nest(DEPTH, 5.0)).write(str(tmp_path / "c"))
    live = nest(DEPTH, 0.0)
    Checkpoint(m=live).read(path).assert_existing_objects_matched()
    node = live
    for _ in range(DEPTH):
        node = node.child
    assert float(node.v) == 5.0


def test_a_cycle_is_still_refused_by_the_iterative_walk(tmp_path: Path) -> None:
    loop: dict[str, Any] = {"x": 1}
    loop["self"] = [loop]
    with pytest.raises(ValueError, match=r"'d/self/0'.*cycle"):
        Checkpoint(d=loop).write(str(tmp_path / "c"))
    shared = [1, 2]
    Checkpoint(d={"a": shared, "b": shared}).write(str(tmp_path / "ok"))  # shared, not a cycle


# ---------------------------------------------------------------------- sequences whose length changed
class Holder(Trackable):
    pass


def holder(t: Any, items: Any) -> Holder:
    h = Holder()
    h.t = t
    h.l = items
    return h


@pytest.mark.parametrize(("live_t", "live_l"), [((7,), [9]), ((7, 8, 9), [9, 9, 9]), ((), [])])
def test_sequences_of_another_length_get_the_saved_value_never_a_mix(
        tmp_path: Path, live_t: tuple[int, ...], live_l: list[int]) -> None:
    path = Checkpoint(s=holder((1, 2), [1, 2])).write(str(tmp_path / "c"))
    live = holder(live_t, live_l)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unused values" warning either: everything was taken
        Checkpoint(s=live).read(path).assert_consumed()
    assert live.t == (1, 2)
    assert live.l == [1, 2]
    assert live.l is live_l  # the list is refilled in place: whoever holds it sees the restore


def test_nested_plain_sequences_are_replaced_whole(tmp_path: Path) -> None:
    saved = {"runs": [{"lr": 0.1, "tags": ("a", "b")}, {"lr": 0.2, "tags": ()}], "n": np.int64(4)}
    path = Checkpoint(cfg=saved).write(str(tmp_path / "c"))
    live: dict[str, Any] = {"runs": [{"lr": 0.0, "tags": ("z",)}], "n": np.int64(0)}
    Checkpoint(cfg=live).read(path).assert_consumed()
    assert live["runs"] == [{"lr": 0.1, "tags": ("a", "b")}, {"lr": 0.2, "tags": ()}]
    assert live["n"] == 4


@pytest.mark.parametrize(("saved", "live", "needle"), [
    pytest.param([np.ones(2), np.ones(2)], [np.zeros(2)], "'s/l/1' is an array", id="arrays"),
    pytest.param([1, 2], [np.zeros(2)], "'s/l/0' is a numpy.ndarray", id="live array"),
    pytest.param([Variable(1.0)], [Variable(0.0), Variable(0.0)], "is an array", id="variables"),
    pytest.param([Holder()], [], "'s/l/0' is an object", id="objects"),
])
def test_sequences_holding_arrays_or_objects_must_keep_their_length(
        tmp_path: Path, saved: list[Any], live: list[Any], needle: str) -> None:
    path = Checkpoint(s=holder((1, 2), saved)).write(str(tmp_path / "c"))
    target = holder((0, 0), live)
    before = list(live)
    with pytest.raises(CheckpointMismatchError, match="nothing was restored") as info:
        Checkpoint(s=target).read(path)
    assert needle in str(info.value)
    assert target.t == (0, 0)  # planned before anything was assigned
    assert target.l == before and all(a is b for a, b in zip(target.l, before, strict=True))


def test_a_named_tuple_of_another_length_is_a_mismatch(tmp_path: Path) -> None:
    Pair = namedtuple("Pair", "x y")
    Triple = namedtuple("Triple", "x y z")
    path = Checkpoint(p=holder(Pair(1, 2), [])).write(str(tmp_path / "c"))
    target = holder(Triple(0, 0, 0), [])
    with pytest.raises(CheckpointMismatchError, match="named tuple has a fixed length"):
        Checkpoint(p=target).read(path)
    assert target.t == Triple(0, 0, 0)


# ---------------------------------------------------------------------- meta tensors
def test_a_meta_tensor_is_refused_at_save_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot checkpoint 's/w': it is a tensor on the meta device"):
        Checkpoint(s={"w": torch.empty(3, device="meta")}).write(str(tmp_path / "c"))
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"'m/weight': it is a tensor on the meta device.*to_empty"):
        Checkpoint(m=module).write(str(tmp_path / "c"))
    assert not list(tmp_path.iterdir())


def test_restoring_into_a_meta_tensor_is_refused_not_a_silent_no_op(tmp_path: Path) -> None:
    real = torch.nn.Linear(2, 2)
    path = Checkpoint(m=real, w=torch.ones(3)).write(str(tmp_path / "c"))
    with pytest.raises(CheckpointMismatchError, match=r"'w': it is a tensor on the meta device.*nothing was restored"):
        Checkpoint(m=torch.nn.Linear(2, 2), w=torch.empty(3, device="meta")).read(path)
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointMismatchError, match=r"'m/weight': it is a tensor on the meta device"):
        Checkpoint(m=module, w=torch.zeros(3)).read(path)
    module.to_empty(device="cpu")
    Checkpoint(m=module, w=torch.zeros(3)).read(path).assert_consumed()
    assert torch.equal(module.weight, real.weight)


def test_a_key_path_too_long_to_read_back_is_refused_at_save(tmp_path: Path) -> None:
    """Readers refuse key paths over MAX_KEY_PATH, so the writer must not produce one."""
    from cloudckpt.format import MAX_KEY_PATH

    too_deep = chain(MAX_KEY_PATH // 2, 1)  # "d/a/a/...": one character and a '/' per level
    with pytest.raises(ValueError, match=r"cannot checkpoint 'd/a/a/a.*key path is \d+ characters long"):
        Checkpoint(d=too_deep).write(str(tmp_path / "deep"))
    with pytest.raises(ValueError, match=f"over the {MAX_KEY_PATH}"):
        Checkpoint(d={"k" * (MAX_KEY_PATH + 1): 1}).write(str(tmp_path / "long"))
    assert not list(tmp_path.iterdir())
    Checkpoint(d={"k" * (MAX_KEY_PATH - 2): 1}).write(str(tmp_path / "ok"))  # "d/" + key: exactly the bound
    assert load_variable(str(tmp_path / "ok"), "d/" + "k" * (MAX_KEY_PATH - 2)) == 1
