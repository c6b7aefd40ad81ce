"""cloudckpt.jax in one process: pytree kinds, dtypes, key paths, restore targets, the manager and async saves.

These run with whatever devices this pytest process's jax has (jax may have been imported
by another test module first, so its device count cannot be chosen here). The 8-device
scenarios - save on a (4, 2) mesh, restore onto (2, 4), (8,), replicated and one device -
run in one spawned process that sets ``XLA_FLAGS`` before it imports jax
(``test_sharded_save_restores_onto_every_mesh``, body in tests/jax_worker.py).
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax_worker
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx, struct

import cloudckpt
import cloudckpt.jax as ccjax
from cloudckpt import (
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointOptions,
    PreemptionCheckpointHandler,
    object_graph,
)
from cloudckpt.format import ArrayEntry
from cloudckpt.format.index_fetch import load_index
from cloudckpt.leaves.jax_array import JaxDeviceArray, use_copier
from cloudckpt.restoring import assign, buffers
from cloudckpt.storage import resolve
from cloudckpt.testing.processes import spawn_reports
from cloudckpt.tools import inspect_checkpoint
from cloudckpt.tools.inspect import CheckpointInfo

SPAWN_TIMEOUT = 240.0
SDS: Any = jax.ShapeDtypeStruct  # jax leaves its constructor unannotated


@struct.dataclass
class TrainState:
    step: int
    params: dict[str, Any]


class Pair(NamedTuple):
    a: Any
    b: Any


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(3, 2, rngs=rngs)


def random_bits(shape: tuple[int, ...], dtype: Any, seed: int) -> jax.Array:
    """An array of ``dtype`` whose bytes are random (NaNs, subnormals and all: bit-exactness, not values)."""
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    if dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        raw = raw % 16  # one element per byte, 4 bits of it used
    return jnp.asarray(raw.view(dtype).reshape(shape))


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.int32, jnp.uint32, jnp.bool_,
          ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.int4, ml_dtypes.uint4, jnp.complex64]


def bits(value: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(value)).tobytes()


def every_kind() -> dict[str, Any]:
    """One tree with every pytree and leaf kind the door promises."""
    _, nnx_state = nnx.split(Tiny(nnx.Rngs(0)))
    params = {"dense": {"kernel": random_bits((3, 4), jnp.float32, 1), "bias": jnp.zeros(4, jnp.bfloat16)}}
    return {
        "params": params,
        "opt_state": optax.adam(1e-3).init(params),
        "train": TrainState(step=3, params={"w": random_bits((2,), jnp.float32, 2)}),
        "pair": Pair(jnp.arange(3), None),
        "nnx": nnx_state,
        "rng": jax.random.key(7),
        "rng_rbg": jax.random.key(8, impl="rbg"),
        "numpy": np.arange(6, dtype=np.int16).reshape(2, 3),
        "scalars": [1, 2.5, "text", True, None, np.float32(0.25)],
        "dtypes": {np.dtype(d).name: random_bits((5, 3), d, i) for i, d in enumerate(DTYPES)},
        "empty": jnp.zeros((0, 4)),
    }


def assert_same_tree(a: Any, b: Any) -> None:
    structure: Any = jax.tree_util.tree_structure(a, is_leaf=lambda x: x is None)
    assert structure == jax.tree_util.tree_structure(b, is_leaf=lambda x: x is None)
    pairs_a = jax.tree_util.tree_flatten_with_path(a, is_leaf=lambda x: x is None)[0]
    for (path, x), y in zip(pairs_a, jax.tree_util.tree_leaves(b, is_leaf=lambda x: x is None), strict=True):
        where = jax.tree_util.keystr(path)
        assert type(x) is type(y), where
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype, where
            assert bits(jax.random.key_data(x)) == bits(jax.random.key_data(y)), where
        elif isinstance(x, (jax.Array, np.ndarray, np.generic)):
            assert (x.dtype, x.shape) == (y.dtype, y.shape), where
            assert bits(x) == bits(y), where
        else:
            assert x == y, where


def test_every_pytree_kind_and_dtype_round_trips_bit_exact(tmp_path: Path) -> None:
    tree = every_kind()
    path = ccjax.save(str(tmp_path / "step-1"), tree)
    restored = ccjax.restore(path, tree)
    assert_same_tree(tree, restored)
    assert restored["params"]["dense"]["kernel"] is not tree["params"]["dense"]["kernel"]
    assert restored["numpy"] is not tree["numpy"]
    bare = ccjax.save(str(tmp_path / "bare"), jnp.arange(3.0))  # a tree that is one leaf: key path "value"
    assert cloudckpt.load_variable(bare, "value").tolist() == [0.0, 1.0, 2.0]
    assert bits(ccjax.restore(bare, jnp.zeros(3))) == bits(jnp.arange(3.0))


def test_key_paths_are_readable_by_load_variable_ls_and_inspect(tmp_path: Path) -> None:
    tree = every_kind()
    path = ccjax.save(str(tmp_path / "step-1"), tree)
    names = dict(cloudckpt.list_variables(path))
    for key in ("params/dense/kernel", "opt_state/0/mu/dense/kernel", "opt_state/0/count", "train/params/w",
                        "train/step", "pair/a", "pair/b", "rng/key_data", "rng/impl", "dtypes/bfloat16",
                "nnx/dense/kernel/value"):
        assert key in names, key
    kernel = cloudckpt.load_variable(path, "params/dense/kernel")
    assert isinstance(kernel, np.ndarray) and bits(kernel) == bits(tree["params"]["dense"]["kernel"])
    assert cloudckpt.load_variable(path, "rng/impl") == "threefry2x32"
    assert cloudckpt.load_variable(path, "train/step") == 3
    info = inspect_checkpoint(path)
    assert isinstance(info, CheckpointInfo)
    leaves = info.leaves
    assert {leaves["dtypes/bfloat16"].dtype, leaves["dtypes/int4"].dtype} == {"bfloat16", "int4"}  # type: ignore[union-attr]


def test_restore_into_shape_dtype_structs_builds_new_arrays(tmp_path: Path) -> None:
    tree = {"w": random_bits((4, 3), jnp.bfloat16, 3), "k": jax.random.key(1), "n": 5}
    path = ccjax.save(str(tmp_path / "s"), tree)
    device = jax.local_devices()[0]
    like = {"w": SDS((4, 3), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device)),
            "k": jax.eval_shape(lambda: jax.random.key(0)), "n": 0}
    restored = ccjax.restore(path, like)
    assert isinstance(restored["w"], jax.Array) and restored["w"].devices() == {device}
    assert_same_tree(tree, restored)
    assert like["n"] == 0 and isinstance(like["w"], jax.ShapeDtypeStruct)


def test_a_restored_array_on_cpu_is_its_read_buffer_not_a_copy(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Restore buffers start at 64-byte boundaries, so jax's CPU ``device_put`` aliases them: the restored
    array is the bytes read (peak extra memory about 1x the state), not a second copy of them."""
    made: list[np.ndarray[Any, Any]] = []

    def recording(entry: ArrayEntry, shape: tuple[int, ...] | None = None) -> np.ndarray[Any, Any]:
        made.append(buffers.new_buffer(entry, shape))
        return made[-1]

    monkeypatch.setattr(assign, "new_buffer", recording)
    tree = {"w": random_bits((512, 1024), jnp.float32, 5), "b": random_bits((3, 5), jnp.bfloat16, 6)}
    restored = ccjax.restore(ccjax.save(str(tmp_path / "s"), tree), tree)
    assert_same_tree(tree, restored)
    assert len(made) == 2 and all(buf.ctypes.data % 64 == 0 for buf in made)
    if jax.local_devices()[0].platform == "cpu":
        big = max(made, key=lambda buf: buf.nbytes)
        assert restored["w"].unsafe_buffer_pointer() == big.ctypes.data  # aliased, not copied
    for shape, dtype in (((1 << 18,), "float32"), ((0, 3), "float64"), ((), "int16"), ((7, 3), "bfloat16")):
        entry = ArrayEntry(dtype=dtype, shape=shape, pytype="ndarray", chunks=())
        buf = buffers.new_buffer(entry)
        assert (buf.shape, buf.dtype.name, buf.flags.c_contiguous) == (shape, dtype, True)
        assert buf.ctypes.data % 64 == 0 or buf.nbytes == 0  # an empty array has no bytes to align


def test_restore_refuses_a_missing_key_or_another_shape_and_keeps_the_tree(tmp_path: Path) -> None:
    path = ccjax.save(str(tmp_path / "s"), {"w": jnp.ones((2, 3))})
    with pytest.raises(CheckpointMismatchError, match="'w'"):
        ccjax.restore(path, {"w": jnp.ones((3, 2))})
    ckpt = ccjax.PyTreeCheckpoint({"w": jnp.ones((2, 3)), "extra": jnp.zeros(2)})
    before = ckpt.tree
    with pytest.raises(CheckpointMismatchError, match="extra"):
        ckpt.read(path)
    assert ckpt.tree is before
    with pytest.raises(ValueError, match="ShapeDtypeStruct"):
        ccjax.save(str(tmp_path / "t"), {"w": SDS((2,), jnp.float32)})
    for reserved in ("save_counter", "_checkpoint_dependencies", "__class__"):
        with pytest.raises(ValueError, match="reserved"):
            ccjax.save(str(tmp_path / "t"), {reserved: jnp.ones(1)})
    tree = {"values": jnp.arange(3), "items": 1, "keys": None, "tree": "a"}  # method and attribute names are keys
    assert_same_tree(tree, ccjax.restore(ccjax.save(str(tmp_path / "u"), tree), tree))


def test_a_plain_checkpoint_takes_jax_arrays_without_the_door(tmp_path: Path) -> None:
    """The leaf kind is registered with the built-in ones: a ``Checkpoint`` of jax arrays needs no cloudckpt.jax."""
    state = {"w": random_bits((3, 2), jnp.float32, 4)}
    saved = bits(state["w"])
    path = cloudckpt.Checkpoint(state=state).save(str(tmp_path / "ck"))
    target = {"w": jnp.zeros((3, 2), jnp.float32)}
    cloudckpt.Checkpoint(state=target).restore(path).assert_consumed()
    assert isinstance(target["w"], jax.Array) and bits(target["w"]) == saved


def test_manager_async_saves_survive_deleted_arrays_and_resume(tmp_path: Path) -> None:
    """When an async save returns, the arrays it saved may be deleted (donated); a new process resumes."""
    directory = str(tmp_path / "run")

    @jax.jit
    def train_step(params: Any) -> Any:
        return jax.tree_util.tree_map(lambda p: p * 2 + 1, params)

    ckpt = ccjax.PyTreeCheckpoint({"params": {"w": jnp.arange(8.0)}, "step": 0, "rng": jax.random.key(0)})
    manager = CheckpointManager(ckpt, directory, max_to_keep=2, options=CheckpointOptions(enable_async=True))
    expected: dict[int, bytes] = {}
    params = train_step(ckpt.tree["params"])
    for step in range(1, 4):
        ckpt.tree = {"params": params, "step": step, "rng": jax.random.split(ckpt.tree["rng"])[0]}
        manager.save()
        expected[step] = bits(params["w"])
        following = train_step(params)
        for leaf in jax.tree_util.tree_leaves(params):
            leaf.delete()  # as a donated buffer would be, right after save returned
        params = following
    ckpt.sync()
    assert [Path(p).name for p in manager.checkpoints] == ["ckpt-2", "ckpt-3"]
    rng_bits = bits(jax.random.key_data(ckpt.tree["rng"]))

    fresh = ccjax.PyTreeCheckpoint({"params": {"w": jnp.zeros(8)}, "step": 0, "rng": jax.random.key(5)})
    resumed = CheckpointManager(fresh, directory, max_to_keep=2)
    assert resumed.restore_or_initialize() is not None
    assert fresh.tree["step"] == 3 and bits(fresh.tree["params"]["w"]) == expected[3]
    assert bits(jax.random.key_data(fresh.tree["rng"])) == rng_bits
    assert int(fresh.save_counter) == 3
    fresh.tree = {"params": {"w": jnp.ones(8)}, "step": 4, "rng": fresh.tree["rng"]}
    assert Path(str(resumed.save())).name == "ckpt-4"
    assert ccjax.restore(f"{directory}/ckpt-4", fresh.tree)["step"] == 4


def test_an_async_save_uploads_cpu_arrays_from_their_own_buffers_and_lets_go_of_them(tmp_path: Path) -> None:
    """A jax.Array is immutable: on CPU an async save stages none of its bytes (no copy while the caller
    waits, as Orbax), the caller may delete it as soon as save returns, and once the save is synced
    nothing holds its buffer any more (a donating step can take it again)."""
    tree = {"w": random_bits((256, 64), jnp.float32, 3), "u": random_bits((128,), jnp.bfloat16, 4),
            "n": np.arange(1000, dtype=np.int64), "step": 1}
    expected = {k: bits(tree[k]) for k in ("w", "u", "n")}
    donate = jax.jit(lambda a: a * 2, donate_argnums=0)
    ckpt = ccjax.PyTreeCheckpoint(tree)
    gc.collect()
    gc.disable()  # a reference cycle holding the save's views must not hide behind a timely collection
    try:
        path = ckpt.save(str(tmp_path / "ck"), options=CheckpointOptions(enable_async=True))
        tree["w"].delete()  # as a donated buffer would be, right after save returned
        ckpt.sync()
        stats = ckpt.last_save_stats
        assert stats is not None and tree["n"].nbytes <= stats.staged_bytes <= tree["n"].nbytes + 8  # + save_counter
        donate(tree["u"])
        assert tree["u"].is_deleted()  # a numpy view of its buffer still held anywhere would have stopped that
    finally:
        gc.enable()
    ckpt.close()
    like = {"w": jnp.zeros((256, 64)), "u": jnp.zeros(128, jnp.bfloat16), "n": np.zeros(1000, np.int64), "step": 0}
    restored = ccjax.restore(path, like)
    assert {k: bits(restored[k]) for k in expected} == expected and restored["step"] == 1


def test_arrays_off_the_cpu_are_read_by_the_copier_in_one_batch_into_the_staging(tmp_path: Path) -> None:
    """The accelerator path (CPU arrays standing in): an async save reads every array in one copier batch
    straight into the staging area, blocks until it completed, and then the arrays may be deleted."""
    slow = jax_worker.CountingJaxCopier(delay=0.1)
    tree = {"w": random_bits((64, 32), jnp.float32, 7), "b": random_bits((5, 3), jnp.bfloat16, 8),
            "i4": random_bits((9,), ml_dtypes.int4, 9), "empty": jnp.zeros((0, 2)), "step": 3}
    expected = {k: bits(v) for k, v in tree.items() if k != "step"}
    leaf = object_graph.collect(cloudckpt.Checkpoint(w=tree["w"]))["w"]
    assert isinstance(leaf, object_graph.ArrayLeaf) and isinstance(leaf.array, np.ndarray)  # CPU: a host view
    with use_copier(slow, cpu_arrays=True):
        leaf = object_graph.collect(cloudckpt.Checkpoint(w=tree["w"]))["w"]
        assert isinstance(leaf, object_graph.ArrayLeaf) and isinstance(leaf.array, JaxDeviceArray)
        ckpt = ccjax.PyTreeCheckpoint(tree)
        first = ckpt.save(str(tmp_path / "ck"), options=CheckpointOptions(enable_async=True))
        assert slow.completed == 1  # the caller returned only once the batch's copies were done
        for value in jax.tree_util.tree_leaves(tree):
            if isinstance(value, jax.Array):
                value.delete()  # donated by the next step: the staged bytes are the snapshot's
        ckpt.sync()
        ckpt.close()
        assert slow.batches == [4]  # one batch for the save, not one read per array
        like = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((5, 3), jnp.bfloat16), "i4": jnp.zeros(9, ml_dtypes.int4),
                "empty": jnp.zeros((0, 2)), "step": 0}
        synced = ccjax.save(str(tmp_path / "sync"), ccjax.restore(first, like))
    assert sum(slow.batches) == 8  # the sync save's ring read each array once
    for path in (first, synced):
        restored = ccjax.restore(path, like)
        assert {k: bits(v) for k, v in restored.items() if k != "step"} == expected and restored["step"] == 3


def test_sharded_save_restores_onto_every_mesh(tmp_path: Path) -> None:
    """8 CPU devices in one spawned process: (4, 2) -> (2, 4), (8,), replicated, one device; bit-exact."""
    [report] = spawn_reports(jax_worker.eight_devices, 1, str(tmp_path), timeout=SPAWN_TIMEOUT)
    assert report["devices"] == 8
    assert report["problems"] == []
    assert sorted(report["restored"]) == ["(2, 4) P('x', 'y')", "(8,) P(None, 'x')", "one device", "replicated"]
    # the (4, 2)-sharded array: 8 distinct boxes; the replicated one: one box, written once
    assert report["chunks"] == {"w": 8, "replicated": 1, "cols": 2, "rng/key_data": 1}
    assert report["copied"] == 8 + 1 + 2 + 1  # through the copier: each written box once, replicas never
    # each restore read at most the bytes its devices hold, never the array many times over
    assert report["bytes_read"]["one device"] == report["bytes_read"]["replicated"] == report["state_bytes"]
    assert report["bytes_read"]["(2, 4) P('x', 'y')"] == report["state_bytes"]
    index = load_index(resolve(f"{tmp_path}/x").storage, "sharded")
    entry = index.entries["w"]
    assert isinstance(entry, ArrayEntry) and entry.shape == (8, 16)


def _doc_block(marker: str) -> str:
    """The ```python block of docs/jax.md that contains ``marker``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "jax.md").read_text()
    blocks = text.split("```python\n")[1:]
    return next(block.split("```", 1)[0] for block in blocks if marker in block)


def test_the_docs_training_loop_saves_async_and_resumes(tmp_path: Path) -> None:
    """docs/jax.md's Flax/optax loop, run as written (on a local directory), twice: the second run resumes."""
    code = _doc_block("restore_or_initialize").replace('"s3://my-bucket/runs/mlp"', repr(str(tmp_path / "mlp")))
    first: dict[str, Any] = {}
    exec(compile(code, "docs/jax.md", "exec"), first)
    assert [Path(p).name for p in first["manager"].checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    second: dict[str, Any] = {}
    exec(compile(code, "docs/jax.md", "exec"), second)
    assert int(second["state"]["step"]) == 30 and second["ckpt"].last_save_stats is None  # resumed: no step ran
    assert_same_tree(first["state"], second["state"])
    assert Path(str(second["manager"].save())).name == "ckpt-4"


def test_an_incremental_save_references_the_unchanged_arrays(tmp_path: Path) -> None:
    """The manager's incremental saves work on JAX state: frozen params are not uploaded again."""
    frozen = {"embed": random_bits((64, 16), jnp.float32, 5)}
    ckpt = ccjax.PyTreeCheckpoint({"frozen": frozen, "head": jnp.zeros(4), "step": 0})
    manager = CheckpointManager(ckpt, str(tmp_path / "run"), max_to_keep=2)
    manager.save()
    ckpt.tree = {"frozen": frozen, "head": jnp.ones(4), "step": 1}
    manager.save()
    stats = ckpt.last_save_stats
    assert stats is not None and stats.reused_bytes == frozen["embed"].nbytes
    assert_same_tree(ckpt.tree, ccjax.restore(str(tmp_path / "run" / "ckpt-2"), ckpt.tree))


def test_a_prng_key_with_an_unknown_impl_is_refused_by_name(tmp_path: Path) -> None:
    """The impl name comes from the checkpoint: one jax does not know fails the restore, naming the key."""
    path = str(tmp_path / "k")
    cloudckpt.Checkpoint(rng={"key_data": np.zeros(2, np.uint32), "impl": "no-such-impl"}).write(path)
    like = {"rng": jax.random.key(0)}
    with pytest.raises(CheckpointMismatchError, match=r"'rng'.*no-such-impl"):
        ccjax.restore(path, like)


def test_import_cloudckpt_and_a_numpy_checkpoint_never_import_jax(tmp_path: Path) -> None:
    """The jax.Array leaf kind is registered with the built-in ones but claims values by their type's module."""
    code = ("import sys, numpy as np, cloudckpt\n"
            "assert 'jax' not in sys.modules, 'import cloudckpt'\n"
            f"path = cloudckpt.Checkpoint(w={{'a': np.ones(3), 'n': 1}}).save({str(tmp_path / 'ck')!r})\n"
            "cloudckpt.Checkpoint(w={'a': np.zeros(3), 'n': 0}).restore(path).assert_consumed()\n"
            "assert 'jax' not in sys.modules and 'jaxlib' not in sys.modules, 'a numpy save and restore'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_a_preemption_notice_saves_the_tree_at_the_step_boundary(tmp_path: Path) -> None:
    ckpt = ccjax.PyTreeCheckpoint({"w": jnp.arange(4.0), "step": 7})
    manager = CheckpointManager(ckpt, str(tmp_path / "run"), max_to_keep=1)
    exited: list[bool] = []
    with PreemptionCheckpointHandler(manager, exit_fn=lambda: exited.append(True)) as handler:
        assert handler.save_checkpoint_if_preempted() is None
        handler.request_preemption()  # as SIGTERM would
        saved = handler.save_checkpoint_if_preempted()
    assert exited == [True] and saved is not None
    assert ccjax.restore(saved, {"w": jnp.zeros(4), "step": 0})["step"] == 7
