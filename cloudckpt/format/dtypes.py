"""dtypes as the index names them: numpy's native kinds and ml_dtypes' (bfloat16, float8, ...),
parsed strictly from a hostile index, ml_dtypes imported only when one is met.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from cloudckpt.errors import CheckpointFormatError
from cloudckpt.format.entries import MAX_ITEMSIZE

#: dtypes numpy lacks natively, named as ml_dtypes names them (its types have numpy's void kind).
ML_DTYPE_NAMES: tuple[str, ...] = (
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
    "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn",
    "int2", "int4", "uint2", "uint4")


@functools.cache
def _ml_dtypes() -> dict[str, np.dtype[Any]]:
    """The ml_dtypes types this ml_dtypes has, by name, imported on first need.

    Why lazily: ml_dtypes 0.7 spends ~0.5 s importing its extension module, which every
    ``import cloudckpt`` paid - each CLI call, each spawned rank - though only a checkpoint
    holding one of these types needs it (an array of one means ml_dtypes is imported already).
    """
    import ml_dtypes

    return {name: np.dtype(getattr(ml_dtypes, name)) for name in ML_DTYPE_NAMES if hasattr(ml_dtypes, name)}


def ml_dtype(name: str) -> np.dtype[Any] | None:
    """The ml_dtypes type called ``name``, or ``None`` where this ml_dtypes lacks it (imports ml_dtypes)."""
    return _ml_dtypes().get(name)


_NATIVE_KINDS = frozenset("biufcUSmM")

# ---------------------------------------------------------------------------- dtypes
def dtype_name(dtype: np.dtype[Any]) -> str:
    """The stored name of a dtype; ``ValueError`` for dtypes a checkpoint cannot hold."""
    if dtype.kind == "V" and dtype.fields is None:
        for name, known in _ml_dtypes().items():
            if dtype == known:
                return name
    if dtype.kind not in _NATIVE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"dtype {dtype} cannot be checkpointed (object, structured and void "
                         f"dtypes are refused: they could hold Python objects)")
    if dtype.kind in "USmM":
        return storage_dtype(dtype).str
    return storage_dtype(dtype).name


def parse_dtype(name: object) -> np.dtype[Any]:
    """The dtype a stored name means; ``CheckpointFormatError`` for anything unknown."""
    if not isinstance(name, str) or not 0 < len(name) <= 40:
        raise CheckpointFormatError(f"dtype must be a short string, got {name!r}")
    if name in ML_DTYPE_NAMES:
        known = ml_dtype(name)
        if known is None:
            raise CheckpointFormatError(f"dtype {name!r} needs a newer ml_dtypes than the one installed")
        return known
    if not re.fullmatch(r"[<|]?[A-Za-z0-9\[\]]+", name):
        raise CheckpointFormatError(f"unknown dtype {name!r}")
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        raise CheckpointFormatError(f"unknown dtype {name!r}") from None
    if (dtype.kind not in _NATIVE_KINDS or dtype.fields is not None or dtype.subdtype is not None
            or not 0 < dtype.itemsize <= MAX_ITEMSIZE):
        raise CheckpointFormatError(f"dtype {name!r} is not allowed in a checkpoint")
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def storage_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The byte order data objects use: little-endian (numpy's ``=`` on every target we run)."""
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
