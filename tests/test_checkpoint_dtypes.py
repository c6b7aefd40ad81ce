"""Every dtype a checkpoint can hold round-trips bit-exactly, including ml_dtypes ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import cloudckpt
from cloudckpt import Checkpoint, Variable

NUMPY_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64", "longdouble", "complex64", "complex128", "clongdouble", "<U7", "|S5",
                "<M8[ns]", "<m8[s]", ">i4", ">f8"]
ML_DTYPES = [name for name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                               "float8_e4m3b11fnuz", "int4", "uint4") if hasattr(ml_dtypes, name)]


def sample(dtype: np.dtype[Any], shape: tuple[int, ...] = (3, 5)) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(0)
    count = int(np.prod(shape))
    if dtype.kind == "b":
        return (rng.integers(0, 2, count) == 1).reshape(shape)
    if dtype.kind in "U":
        return np.array([f"s{i}é" for i in range(count)], dtype=dtype).reshape(shape)
    if dtype.kind in "S":
        return np.array([f"b{i}".encode() for i in range(count)], dtype=dtype).reshape(shape)
    if dtype.kind in "mM":
        return rng.integers(0, 10**9, count).astype(dtype).reshape(shape)
    if dtype.kind in "iu" and dtype.itemsize >= 1 and dtype.name not in ("int4", "uint4"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, count, dtype=np.int64 if info.max < 2**63 else np.uint64,
                            endpoint=False).astype(dtype).reshape(shape)
    if dtype.name in ("int4", "uint4"):  # ml_dtypes' 4-bit integers: every value in range, no invalid cast
        low = -8 if dtype.name == "int4" else 0
        return rng.integers(low, low + 16, count).astype(dtype).reshape(shape)
    values = rng.standard_normal(count) * 3
    if dtype.kind == "c":
        return (values + 1j * values[::-1]).astype(dtype).reshape(shape)
    return values.astype(dtype).reshape(shape)


@pytest.mark.parametrize("name", NUMPY_DTYPES + ML_DTYPES)
def test_dtype_round_trip(tmp_path: Path, name: str) -> None:
    dtype = np.dtype(getattr(ml_dtypes, name)) if name in ML_DTYPES else np.dtype(name)
    original = sample(dtype)
    path = Checkpoint(a=original, v=Variable(original[0])).write(tmp_path / "c")
    target = np.zeros_like(original)
    variable = Variable(np.zeros_like(original[0]))
    Checkpoint(a=target, v=variable).read(path).assert_consumed()
    assert target.dtype == original.dtype
    assert target.tobytes() == original.tobytes()
    assert variable.numpy().tobytes() == original[0].tobytes()
    loaded = cloudckpt.load_variable(path, "a")
    assert loaded.tobytes() == original.astype(original.dtype.newbyteorder("<")).tobytes()


def test_shapes_zero_size_and_scalars(tmp_path: Path) -> None:
    arrays = {"empty": np.zeros((0, 3), np.float32), "scalar": np.array(3.5), "big_rank": np.ones((1,) * 10),
              "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "strided": np.arange(20.0)[::2]}
    path = Checkpoint(arrays=arrays).write(tmp_path / "c")
    target = {k: np.zeros_like(v) for k, v in arrays.items()}
    target["fortran"] = np.asfortranarray(np.zeros((3, 4)))
    fortran_ref = target["fortran"]
    Checkpoint(arrays=target).read(path).assert_consumed()
    for key, value in arrays.items():
        np.testing.assert_array_equal(target[key], value)
    assert target["fortran"] is fortran_ref and fortran_ref.flags.f_contiguous


def test_read_only_array_is_refused(tmp_path: Path) -> None:
    path = Checkpoint(a=np.ones(3)).write(tmp_path / "c")
    frozen = np.zeros(3)
    frozen.flags.writeable = False
    with pytest.raises(cloudckpt.CheckpointMismatchError, match="read-only"):
        Checkpoint(a=frozen).read(path)


def test_ml_dtypes_is_imported_only_when_a_checkpoint_holds_one_of_its_types(tmp_path: Path) -> None:
    """ml_dtypes 0.7 takes ~0.5 s to import: ``import cloudckpt`` (each CLI call, each spawned
    rank) must not pay it; reading a bfloat16 checkpoint imports it and gets the type back."""
    plain = Checkpoint(n=np.arange(3.0)).write(tmp_path / "plain")
    bf16 = Checkpoint(w=sample(np.dtype(ml_dtypes.bfloat16))).write(tmp_path / "bf16")
    code = f"""
import sys
import cloudckpt, cloudckpt.cli, cloudckpt.tfbundle
assert "ml_dtypes" not in sys.modules, "imported by import cloudckpt"
assert cloudckpt.load_variable({str(plain)!r}, "n").tolist() == [0.0, 1.0, 2.0]
assert "ml_dtypes" not in sys.modules, "imported by a float64 checkpoint's read"
print(cloudckpt.load_variable({str(bf16)!r}, "w").dtype.name)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bfloat16"]
