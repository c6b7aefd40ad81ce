"""Orbax checkpoints read as a foreign format: real Orbax 0.12 writes them, cloudckpt reads them.

Orbax (``StandardCheckpointer``, ``PyTreeCheckpointer`` with zarr v3, a ``CheckpointManager``
step with Composite items) writes small trees once per module; each store gets a copy of the
directories, uploaded as they are (Orbax's own path layer cannot write to ``s3://``, and on GCS
only to real GCS). Values must come back bit-exact, under cloudckpt key paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import servers

import cloudckpt
from cloudckpt.errors import CheckpointFormatError, MissingDependencyError
from cloudckpt.format import CheckpointIndex
from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat, load_any_index
from cloudckpt.orbax import arrays, kvstore, layout
from cloudckpt.orbax.reader import OrbaxReader
from cloudckpt.storage import open_storage


def expected_tree() -> dict[str, Any]:
    """The tree every Orbax checkpoint here holds (numpy, so it compares without jax)."""
    rng = np.random.default_rng(7)
    return {
        "params": {"dense": {"kernel": rng.standard_normal((3, 4)).astype(np.float32),
                             "bias": rng.standard_normal(4).astype(ml_dtypes.bfloat16)},
                   "embed": rng.integers(-9, 9, (5, 2)).astype(np.int32)},
        "opt": [np.arange(6, dtype=np.int64).reshape(2, 3), np.array([1.5, -2.0], dtype=np.float16)],
        "step": 7,
        "lr": 0.25,
    }


def _orbax_tree(tree: dict[str, Any]) -> dict[str, Any]:
    import jax.numpy as jnp

    out = dict(tree)
    out["params"] = {"dense": {k: jnp.asarray(v) for k, v in tree["params"]["dense"].items()},
                     "embed": jnp.asarray(tree["params"]["embed"])}
    return out  # opt stays numpy (Orbax's np.ndarray handler), step/lr Python scalars


def write_checkpoints(root: Path) -> None:
    """What real Orbax writes, in ``root``: standard/, zarr3/, plain/ (no OCDBT), chunked/, manager/5."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    tree = _orbax_tree(expected_tree())
    standard = ocp.StandardCheckpointer()
    standard.save(root / "standard", tree)
    standard.wait_until_finished()
    rich = {**tree, "name": "run-7", "nothing": None, "empty": {}}
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)).save(root / "zarr3", args=ocp.args.PyTreeSave(rich))
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(root / "plain", args=ocp.args.PyTreeSave(tree))
    big = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)}
    ocp.PyTreeCheckpointer().save(root / "chunked", args=ocp.args.PyTreeSave(
        big, save_args={"w": ocp.SaveArgs(chunk_byte_size=4096)}))
    manager = ocp.CheckpointManager(root / "manager")
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), extra=ocp.args.JsonSave({"x": 1})))
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("orbax")
    write_checkpoints(root)
    return root


def upload(source: Path, url: str) -> None:
    """Every file under ``source`` to ``url``, under the same relative names."""
    storage = open_storage(url)
    for path in sorted(source.rglob("*")):
        if path.is_file():
            storage.put(path.relative_to(source).as_posix(), path.read_bytes())


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request: pytest.FixtureRequest, written: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The Orbax checkpoints on each backend."""
    if request.param == "local":
        yield str(written)
        return
    if request.param == "s3":
        server: servers.Server = request.getfixturevalue("seaweedfs")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        root = f"s3://{request.getfixturevalue('s3_bucket')}/orbax-{uuid.uuid4().hex[:8]}"
    else:
        request.getfixturevalue("fake_gcs")
        root = f"gs://{request.getfixturevalue('gcs_bucket')}/orbax-{uuid.uuid4().hex[:8]}"
    upload(written, root)
    yield root


def assert_bits(got: Any, want: Any, key: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape, want.dtype, want.shape)
    assert got.tobytes() == want.tobytes(), key


def orbax_reader(directory: Path, name: str) -> OrbaxReader:
    """The reader the core gets for Orbax checkpoint ``directory/name``."""
    found = load_any_index(open_storage(directory), name)
    assert isinstance(found, ForeignCheckpoint) and isinstance(found.reader, OrbaxReader)
    return found.reader


FLAT: dict[str, Callable[[dict[str, Any]], Any]] = {
    "params/dense/kernel": lambda t: t["params"]["dense"]["kernel"],
    "params/dense/bias": lambda t: t["params"]["dense"]["bias"],
    "params/embed": lambda t: t["params"]["embed"],
    "opt/0": lambda t: t["opt"][0],
    "opt/1": lambda t: t["opt"][1],
    "step": lambda t: np.int64(t["step"]),
    "lr": lambda t: np.float64(t["lr"]),
}


def test_every_store_reads_the_standard_checkpoint_bit_exact(store: str) -> None:
    want = expected_tree()
    reader = cloudckpt.load_checkpoint(f"{store}/standard")
    assert reader.get_variable_to_shape_map() == {
        "params/dense/kernel": [3, 4], "params/dense/bias": [4], "params/embed": [5, 2],
        "opt/0": [2, 3], "opt/1": [2], "step": [], "lr": []}
    dtypes = reader.get_variable_to_dtype_map()
    assert dtypes["params/dense/bias"] == np.dtype(ml_dtypes.bfloat16) and dtypes["opt/1"] == np.float16
    for key, pick in FLAT.items():
        assert_bits(reader.get_tensor(key), pick(want), key)
        assert reader.has_tensor(key)
    assert not reader.has_tensor("params")
    dense = cloudckpt.load_variable(f"{store}/standard", "params/dense")
    assert sorted(dense) == ["bias", "kernel"]
    assert_bits(dense["bias"], want["params"]["dense"]["bias"], "subtree bias")
    step = cloudckpt.load_variable(f"{store}/manager/5", "state/step")
    assert isinstance(step, np.int64) and step == 7
    assert sorted(cloudckpt.list_variables(f"{store}/manager/5"))[0] == ("state/lr", [])
    found = load_any_index(open_storage(store), "standard")
    assert isinstance(found, ForeignCheckpoint) and found.format is IndexFormat.ORBAX
    assert "standard/_METADATA" in found.objects and "standard/manifest.ocdbt" in found.objects


def test_zarr3_strings_empty_leaves_no_ocdbt_and_chunk_grids(written: Path) -> None:
    reader = cloudckpt.load_checkpoint(written / "zarr3")
    shapes = reader.get_variable_to_shape_map()
    assert "nothing" not in shapes and "empty" not in shapes  # None and {} hold no value
    assert reader.get_tensor("name") == "run-7" and reader.get_variable_to_dtype_map()["name"] is str
    want = expected_tree()
    plain = cloudckpt.load_checkpoint(written / "plain")  # use_ocdbt=False: one zarr directory per leaf
    for key, pick in FLAT.items():
        assert_bits(reader.get_tensor(key), pick(want), f"zarr3 {key}")
        assert_bits(plain.get_tensor(key), pick(want), f"plain {key}")
    w = cloudckpt.load_variable(written / "chunked", "w")
    assert_bits(w, np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "chunked w")
    metas = orbax_reader(written, "chunked").array_metas()
    assert metas["w"].chunk_count > 1  # chunk_byte_size=4096 made a grid of chunks


def test_manager_step_reads_its_pytree_items_and_names_the_others(written: Path) -> None:
    reader = orbax_reader(written / "manager", "5")
    assert reader.layout.skipped == (
        "extra (orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler)",)
    assert sorted(reader.get_variable_to_shape_map()) == sorted(f"state/{k}" for k in FLAT)


def test_import_registers_without_tensorstore_or_jax() -> None:
    code = ("import sys, cloudckpt\n"
            "from cloudckpt.format import sniff\n"
            "assert sniff._LAYOUTS[sniff.IndexFormat.ORBAX].marker == '_CHECKPOINT_METADATA'\n"
            "print(sorted(m for m in ('tensorstore', 'jax', 'orbax') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_tensorstore_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    with pytest.raises(MissingDependencyError, match=r"cloudckpt\[orbax\]"):
        kvstore.tensorstore()


# ---------------------------------------------------------------------------- written by 2 processes
TWO_PROCESS_WRITER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
rank, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                           initialization_timeout=60)
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2, 2), ("x", "y"))
g = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7
v = np.arange(10, dtype=np.int32) * 3
tree = {"w": jax.make_array_from_callback(g.shape, NamedSharding(mesh, P("x", "y")), lambda i: g[i]),
        "cols": jax.make_array_from_callback((6, 8), NamedSharding(mesh, P(None, "x")), lambda i: g.T[i]),
        "v": jax.make_array_from_callback(v.shape, NamedSharding(mesh, P()), lambda i: v[i])}
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(path, tree)
checkpointer.wait_until_finished()
"""


def test_a_checkpoint_two_processes_wrote_reads_whole(tmp_path: Path) -> None:
    """Orbax on 2 processes x 2 CPU devices (jax.distributed): each process writes its shards into its
    own OCDBT subtree (ocdbt.process_N), merged by the top manifest; the global arrays read back."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_WRITER, str(rank), str(port), str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        errors = [proc.communicate(timeout=180)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert [proc.returncode for proc in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert (path / "ocdbt.process_0").is_dir() and (path / "ocdbt.process_1").is_dir()
    g = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 7
    assert_bits(cloudckpt.load_variable(path, "w"), g, "w")
    assert_bits(cloudckpt.load_variable(path, "cols"), np.ascontiguousarray(g.T), "cols")
    assert_bits(cloudckpt.load_variable(path, "v"), np.arange(10, dtype=np.int32) * 3, "v")


# ---------------------------------------------------------------------------- hostile input
def _copy(written: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    return Path(shutil.copytree(written / name, tmp_path / name))


def test_metadata_that_is_not_json_or_too_large_or_unknown_is_refused(written: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _copy(written, tmp_path, "standard")
    (ckpt / "_METADATA").write_bytes(b"\x00not json")
    with pytest.raises(CheckpointFormatError, match=r"_METADATA is not JSON"):
        cloudckpt.load_checkpoint(ckpt)
    doc = json.loads((written / "standard" / "_METADATA").read_text())
    entry = doc["tree_metadata"]["('step',)"]
    entry["value_metadata"]["value_type"] = "my.CustomThing"
    (ckpt / "_METADATA").write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match=r"'step' has value type 'my.CustomThing'"):
        cloudckpt.load_checkpoint(ckpt)
    entry["value_metadata"]["value_type"] = "scalar"
    entry["key_metadata"] = [{"key": "x/../y", "key_type": 1}]
    (ckpt / "_METADATA").write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match=r"sequence index 'x/../y'"):
        cloudckpt.load_checkpoint(ckpt)
    monkeypatch.setattr(layout, "MAX_METADATA_BYTES", 100)
    with pytest.raises(CheckpointFormatError, match=r"_METADATA is \d+ bytes, over the 100-byte limit"):
        cloudckpt.load_checkpoint(ckpt)


def test_an_array_claiming_more_than_is_stored_is_refused_before_allocating(written: Path, tmp_path: Path) -> None:
    import tensorstore as ts

    ckpt = _copy(written, tmp_path, "standard")
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{ckpt}/"}).result()
    meta = json.loads(store[b"params.embed/.zarray"])
    meta["shape"], meta["chunks"] = [1 << 20, 1 << 20], [1 << 19, 1 << 19]  # 4 TiB in 4 chunks, 1 stored
    store[b"params.embed/.zarray"] = json.dumps(meta).encode()
    reader = cloudckpt.load_checkpoint(ckpt)
    assert reader.get_variable_to_shape_map()["params/embed"] == [1 << 20, 1 << 20]
    with pytest.raises(CheckpointFormatError, match=r"'params/embed' of Orbax checkpoint .*claims 4 chunks.*but 1 "
                                                   r"are stored"):
        reader.get_tensor("params/embed")
    assert_bits(reader.get_tensor("step"), np.int64(7), "step")  # the others still read


def test_a_missing_chunk_is_damage_not_zeros(written: Path, tmp_path: Path) -> None:
    import tensorstore as ts

    ckpt = _copy(written, tmp_path, "standard")
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{ckpt}/"}).result()
    del store[b"params.embed/0.0"]  # Orbax wrote every chunk (store_array_data_equal_to_fill_value)
    reader = cloudckpt.load_checkpoint(ckpt)
    with pytest.raises(CheckpointFormatError, match=r"'params/embed' of Orbax checkpoint .*claims 1 chunks.*but 0 "
                                                   r"are stored"):
        reader.get_tensor("params/embed")


@pytest.mark.parametrize(("doc", "message"), [
    ({"shape": [-1], "chunks": [1], "dtype": "<f4"}, "shape"),
    ({"shape": [1] * 65, "chunks": [1] * 65, "dtype": "<f4"}, "at most 64"),
    ({"shape": [4], "chunks": [0], "dtype": "<f4"}, "chunk shape"),
    ({"shape": [4, 4], "chunks": [4], "dtype": "<f4"}, "does not match"),
    ({"shape": [4], "chunks": [4], "dtype": "|O"}, "dtype"),
    ({"shape": [1 << 40, 1 << 40], "chunks": [1 << 40, 1 << 40], "dtype": "<f8"}, "over"),
    ({"shape": [1 << 30], "chunks": [1], "dtype": "<f4"}, "chunks, over the limit"),
])
def test_zarr_metadata_is_validated(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointFormatError, match=message) as caught:
        arrays.parse_metadata(json.dumps(doc).encode(), False, "'w' of Orbax checkpoint /x")
    assert "'w' of Orbax checkpoint /x" in str(caught.value)


# ---------------------------------------------------------------------------- migration
def run_recipe(src: str, dst: str) -> None:
    """The migration recipe of docs/orbax-import.md, run as written there."""
    text = (Path(__file__).parent.parent / "docs" / "orbax-import.md").read_text()
    block = text.split("<!-- recipe -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/orbax-import.md", "exec"), {"ORBAX_DIR": src, "TARGET": dst})


def test_the_migration_recipe_copies_bit_exact(store: str, tmp_path: Path) -> None:
    target = str(tmp_path / "migrated" / "ckpt-1")
    run_recipe(f"{store}/standard", target)
    want = expected_tree()
    for key, pick in FLAT.items():
        assert_bits(cloudckpt.load_variable(target, key), pick(want), f"migrated {key}")
    assert isinstance(load_any_index(open_storage(target.rsplit("/", 1)[0]), "ckpt-1"), CheckpointIndex)


def test_tensorstore_failures_are_told_apart() -> None:
    from cloudckpt.errors import StorageError
    from cloudckpt.orbax.reader import _failed

    store = _failed(ValueError("UNAVAILABLE: All 6 retry attempts failed"), "cannot read 'w'", "s3://b/c")
    data = _failed(ValueError("DATA_LOSS: Error decoding chunk"), "cannot read 'w'", "s3://b/c")
    assert isinstance(store, StorageError) and store.url == "s3://b/c" and "cannot read 'w'" in str(store)
    assert isinstance(data, CheckpointFormatError) and not isinstance(data, StorageError)


# ---------------------------------------------------------------------------- tools (the generic foreign path)
def test_tools_list_inspect_verify_on_every_store(store: str) -> None:
    from cloudckpt.tools import inspect_checkpoint, list_checkpoints, verify

    rows = {row.name: row for row in list_checkpoints(store).checkpoints}
    assert {"standard", "zarr3", "chunked"} <= set(rows), rows
    doc = inspect_checkpoint(f"{store}/standard").to_json()
    entries = {e["key"]: e for e in doc["entries"]}
    assert sorted(entries) == sorted(FLAT)
    assert entries["params/dense/bias"]["dtype"] == "bfloat16" and entries["params/embed"]["shape"] == [5, 2]
    assert verify(f"{store}/manager/5").intact


def test_cli_ls_inspect_cp(written: Path, tmp_path: Path) -> None:
    from test_cli import cli

    listing = cli("ls", str(written), "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)["checkpoints"]}
    assert rows["standard"]["format"] == "orbax" and rows["standard"]["status"] == "committed", rows
    shown = cli("inspect", str(written / "zarr3"))
    assert shown.returncode == 0 and "Orbax checkpoint" in shown.stdout, shown.stdout + shown.stderr
    assert "bfloat16" in shown.stdout and "params/dense/bias" in shown.stdout
    copied = cli("cp", str(written / "standard"), str(tmp_path / "ckpt-3"))
    assert copied.returncode == 0, copied.stderr
    want = expected_tree()
    for key, pick in FLAT.items():
        assert_bits(cloudckpt.load_variable(tmp_path / "ckpt-3", key), pick(want), f"cli cp {key}")


def test_cp_into_cloudckpt_format_then_ccjax_restore_bit_exact(store: str, tmp_path: Path) -> None:
    import jax

    import cloudckpt.jax as ccjax
    from cloudckpt.tools import copy

    target = str(tmp_path / "run" / "ckpt-1")
    copy(f"{store}/standard", target)
    assert isinstance(load_any_index(open_storage(str(tmp_path / "run")), "ckpt-1"), CheckpointIndex)
    want = expected_tree()
    sds: Any = jax.ShapeDtypeStruct  # jax leaves its constructor unannotated
    like = {"params": jax.tree.map(lambda a: sds(a.shape, a.dtype), want["params"]),
            "opt": [np.zeros_like(a) for a in want["opt"]]}
    restored = ccjax.restore(target, like)
    assert isinstance(restored["params"]["embed"], jax.Array)
    got = {"params/dense/kernel": restored["params"]["dense"]["kernel"],
           "params/dense/bias": restored["params"]["dense"]["bias"],
           "params/embed": restored["params"]["embed"], "opt/0": restored["opt"][0], "opt/1": restored["opt"][1]}
    for key, value in got.items():
        assert_bits(np.asarray(value), FLAT[key](want), f"ccjax {key}")
    assert cloudckpt.load_variable(target, "step") == 7
