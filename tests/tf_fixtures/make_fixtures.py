"""Write the TensorFlow checkpoints the TensorBundle reader is tested against, with real TensorFlow.

Run once, by hand, in a virtual environment that has TensorFlow (never a project dependency;
CI reads the committed files without it)::

    python3 -m venv /work/tfvenv && /work/tfvenv/bin/pip install tensorflow-cpu
    /work/tfvenv/bin/python tests/tf_fixtures/make_fixtures.py

It replaces ``tests/tf_fixtures/data/`` with:

- ``basic/ckpt-1``: a Keras-free ``tf.train.Checkpoint`` of ``tf.Variable`` s of every
  dtype a variable can hold here (scalar, 0-size, bfloat16, int64, bool, strings, ...) and
  a ``tf.Module`` tree (a list of sub-modules, a dict with awkward key names);
- ``optimizer/ckpt-1``: a module and a ``tf.compat.v1.train.AdamOptimizer`` (slot variables
  ``m``/``v`` and non-slot ``beta1_power``/``beta2_power``) after one step;
- ``manager/``: a ``tf.train.CheckpointManager`` directory (``max_to_keep=3``, four saves)
  with TensorFlow's state file ``checkpoint``;
- ``sharded/ckpt-1``: one checkpoint split over several data shards by
  ``tf.train.experimental.MaxShardSizePolicy``;
- ``partitioned/model.ckpt``: a ``tf.compat.v1`` graph with partitioned variables saved
  by a V1 ``Saver`` (V2 format, sharded): TensorBundle slices, no object graph.

Next to each checkpoint, ``<name>.expected.json`` holds what every raw bundle key must
decode to - TensorFlow's own ``tf.train.load_checkpoint(...).get_tensor`` - as values
(nested lists; bfloat16/float8 as floats; complex as ``[re, im]``; strings as latin-1
text, which round-trips every byte), with TensorFlow's dtype name and shape.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent / "data"
#: Keys whose values are not data a user saved (the object graph is a serialized proto).
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def json_value(array: np.ndarray) -> Any:
    """An array's values as JSON: exact for every dtype used here."""
    if array.dtype.kind == "O" or array.dtype.kind == "S":
        flat = [bytes(x).decode("latin-1") for x in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    if array.dtype.kind == "c":
        return np.stack([array.real, array.imag], axis=-1).tolist()
    if array.dtype.name in ("int4", "int2"):
        return array.astype(np.int8).tolist()
    if array.dtype.name in ("uint4", "uint2"):
        return array.astype(np.uint8).tolist()
    if array.dtype.kind == "V":  # bfloat16, float8: exact as float64
        return array.astype(np.float64).tolist()
    return array.tolist()


def write_expected(prefix: str) -> None:
    """``<prefix>.expected.json``: every key as TensorFlow itself reads it back."""
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    doc: dict[str, Any] = {"tensorflow": tf.__version__, "keys": {}}
    for key in sorted(shapes):
        value = reader.get_tensor(key)
        array = np.asarray(value)
        entry = {"dtype": dtypes[key].name, "shape": list(shapes[key])}
        if key != OBJECT_GRAPH_KEY:
            entry["value"] = json_value(array)
        doc["keys"][key] = entry
    lines = [f"  {json.dumps(key)}: {json.dumps(doc['keys'][key], sort_keys=True)}" for key in sorted(doc["keys"])]
    text = f'{{"tensorflow": {json.dumps(doc["tensorflow"])}, "keys": {{\n' + ",\n".join(lines) + "\n}}\n"
    Path(prefix + ".expected.json").write_text(text)


class Layer(tf.Module):
    def __init__(self, n_in: int, n_out: int, seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(rng.standard_normal((n_in, n_out)).astype(np.float32))
        self.bias = tf.Variable(np.arange(n_out, dtype=np.float32) / 4)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, self.kernel) + self.bias


class Model(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [Layer(3, 4, 1), Layer(4, 2, 2)]
        self.config = {"a/b": tf.Variable(7, dtype=tf.int64), "x.y": tf.Variable([1.5, -2.5])}

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def maybe(dtype_name: str, make: Any) -> dict[str, tf.Variable]:
    """A variable of a dtype this TensorFlow may not support as a variable (float8, int4)."""
    try:
        return {dtype_name: make()}
    except Exception as exc:  # report and go on: the fixture still covers the rest
        print(f"skipping {dtype_name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}


def basic() -> None:
    rng = np.random.default_rng(0)
    variables = {
        "f32": tf.Variable(rng.standard_normal((3, 5)).astype(np.float32)),
        "f64_scalar": tf.Variable(np.float64(np.pi)),
        "empty": tf.Variable(np.zeros((0, 3), np.float32)),
        "bf16": tf.Variable(tf.constant([1.0, -2.5, 3.140625, 65280.0], dtype=tf.bfloat16)),
        "f16": tf.Variable(np.array([0.5, -1.0, 65504.0], np.float16)),
        "i64": tf.Variable(np.array([-(2**62), 0, 2**62 + 5], np.int64)),
        "i32": tf.Variable(np.array([[1, -2], [3, -4]], np.int32)),
        "i16": tf.Variable(np.array([-32768, 32767], np.int16)),
        "i8": tf.Variable(np.array([-128, 0, 127], np.int8)),
        "u8": tf.Variable(np.array([0, 200, 255], np.uint8)),
        "u16": tf.Variable(np.array([65535, 1], np.uint16)),
        "u32": tf.Variable(np.array([2**32 - 1, 3], np.uint32)),
        "u64": tf.Variable(np.array([2**64 - 1, 9], np.uint64)),
        "c64": tf.Variable(np.array([1 + 2j, -3.5j], np.complex64)),
        "c128": tf.Variable(np.array([[1e300 - 1j]], np.complex128)),
        "flags": tf.Variable(np.array([[True, False], [False, True]])),
        "text": tf.Variable("hello, checkpoint"),
        "texts": tf.Variable([b"", b"two\x00nul", b"\xff\xfe bytes", "ünïcode".encode(), b"x" * 300]),
        "nan_inf": tf.Variable(np.array([np.nan, np.inf, -np.inf, -0.0], np.float32)),
    }
    experimental = tf.dtypes.experimental
    variables.update(maybe("f8e4m3", lambda: tf.Variable(tf.constant([1.0, -0.5, 448.0], experimental.float8_e4m3fn))))
    variables.update(maybe("f8e5m2", lambda: tf.Variable(tf.constant([2.0, -0.25], experimental.float8_e5m2))))
    variables.update(maybe("int4", lambda: tf.Variable(tf.constant([-8, 7, 1], experimental.int4))))
    variables.update(maybe("uint4", lambda: tf.Variable(tf.constant([0, 15, 3], experimental.uint4))))
    model = Model()
    model(tf.ones((1, 3)))
    ckpt = tf.train.Checkpoint(model=model, **variables)
    ckpt.step = tf.Variable(42, dtype=tf.int64)
    path = ckpt.save(str(OUT / "basic" / "ckpt"))
    write_expected(path)


def optimizer() -> None:
    model = Model()
    opt = tf.compat.v1.train.AdamOptimizer(learning_rate=0.01)
    x = tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    variables = [layer.kernel for layer in model.layers] + [layer.bias for layer in model.layers]
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(OUT / "optimizer" / "ckpt"))
    write_expected(path)


def manager() -> None:
    step = tf.Variable(0, dtype=tf.int64)
    weights = tf.Variable(np.zeros((2, 3), np.float32))
    ckpt = tf.train.Checkpoint(step=step, weights=weights)
    mgr = tf.train.CheckpointManager(ckpt, str(OUT / "manager"), max_to_keep=3)
    for i in range(1, 5):
        step.assign(i * 10)
        weights.assign(np.full((2, 3), i, np.float32))
        path = mgr.save()
        if i > 1:
            write_expected(path)
    stale = OUT / "manager" / "ckpt-1.expected.json"
    stale.unlink(missing_ok=True)


def sharded() -> None:
    rng = np.random.default_rng(3)
    variables = {f"w{i}": tf.Variable(rng.standard_normal((16, 16)).astype(np.float32)) for i in range(5)}
    variables["names"] = tf.Variable([b"alpha", b"beta"])
    ckpt = tf.train.Checkpoint(**variables)
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=1500)
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    path = ckpt.save(str(OUT / "sharded" / "ckpt"), options=options)
    write_expected(path)


def partitioned() -> None:
    graph = tf.Graph()
    with graph.as_default():
        init = tf.compat.v1.random_normal_initializer(seed=5)
        tf.compat.v1.get_variable("part", shape=[10, 4], initializer=init,
                                  partitioner=tf.compat.v1.fixed_size_partitioner(3))
        # Slice starts past 63 and 8191 take 2- and 3-byte OrderedCode numbers in the slice keys.
        tf.compat.v1.get_variable("long", shape=[16500], dtype=tf.int8, initializer=tf.compat.v1.ones_initializer(),
                                  partitioner=tf.compat.v1.fixed_size_partitioner(2))
        tf.compat.v1.get_variable("plain", initializer=np.array([1, 2, 3], np.int32))
        saver = tf.compat.v1.train.Saver(sharded=True)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            # No state file (the V1 Saver records absolute paths of this machine) and no MetaGraphDef.
            path = saver.save(session, str(OUT / "partitioned" / "model.ckpt"), write_state=False,
                              write_meta_graph=False)
    write_expected(path)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for make in (basic, optimizer, manager, sharded, partitioned):
        (OUT / make.__name__).mkdir(parents=True, exist_ok=True)
        make()
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:8d}  {path.relative_to(OUT)}")


if __name__ == "__main__":
    main()
