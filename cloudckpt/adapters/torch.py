"""PyTorch: tensors to numpy and back (zero-copy where possible), generators, strict modules.

The only module that imports torch. Tensors travel as numpy arrays sharing their memory
(``Tensor.numpy()`` / ``torch.from_numpy``); dtypes numpy lacks go through a same-width
integer view and come out as their ``ml_dtypes`` twin (``torch.bfloat16`` <->
``ml_dtypes.bfloat16``), so the stored bytes and the dtype name are both faithful.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from cloudckpt.adapters import StateAdapter
from cloudckpt.format import ml_dtype

#: torch dtypes numpy lacks -> (the ml_dtypes name of their twin, a same-width integer dtype to view through).
_VIEWED: dict[torch.dtype, tuple[str, torch.dtype]] = {torch.bfloat16: ("bfloat16", torch.int16)}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _VIEWED[getattr(torch, _name)] = (_name, torch.uint8)


@functools.cache
def _twin(dtype: torch.dtype) -> tuple[np.dtype[Any], torch.dtype] | None:
    """``(ml_dtypes twin, view dtype)`` of a torch dtype numpy lacks; ``None`` for the others.

    Looked up on first need so that ml_dtypes (~0.5 s to import, for 0.7) is imported only
    by a state that holds such a tensor.
    """
    if dtype not in _VIEWED:
        return None
    name, view = _VIEWED[dtype]
    twin = ml_dtype(name)
    return None if twin is None else (twin, view)


@functools.cache
def _from_twin(dtype: np.dtype[Any]) -> tuple[torch.dtype, np.dtype[Any]] | None:
    """``(torch dtype, integer view dtype)`` for an ml_dtypes type torch has; ``None`` for the others."""
    for torch_dtype in _VIEWED:
        found = _twin(torch_dtype)
        if found is not None and found[0] == dtype:
            return torch_dtype, np.dtype(torch.empty(0, dtype=found[1]).numpy().dtype)
    return None


def is_tensor(obj: object) -> bool:
    return isinstance(obj, torch.Tensor)


#: Why a meta tensor cannot be saved or restored into (see ``no_data``).
META_PROBLEM = ("it is a tensor on the meta device: it has a shape and dtype but no data (materialize it "
                "first, e.g. module.to_empty(device='cpu'))")


def no_data(tensor: Any) -> str | None:
    """Why ``tensor`` has no bytes to save or to restore into, or ``None``.

    A meta tensor (``torch.device("meta")``, deferred initialization) has no storage:
    saving it would need data that does not exist, and restoring into it would be a
    silent no-op (``load_state_dict`` only warns), so both are refused, naming the key.
    """
    return META_PROBLEM if tensor.device.type == "meta" else None


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, dense CPU tensor; refuses layouts that have no flat bytes, and meta tensors."""
    problem = no_data(tensor)
    if problem is not None:
        raise ValueError(problem)
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise ValueError(f"torch tensors with layout {tensor.layout} (or quantized) cannot be checkpointed")
    return tensor.detach().cpu() if tensor.device.type != "cpu" else tensor.detach()


def tensor_to_numpy(tensor: Any) -> NDArray[Any]:
    """A numpy array with the tensor's values: a view of its memory for CPU tensors.

    Raises:
        ValueError: complex32 and other dtypes with no numpy or ml_dtypes twin.
    """
    plain = _plain(tensor)
    twin = _twin(plain.dtype)
    if twin is not None:
        ml, view = twin
        return plain.view(view).numpy().view(ml)
    try:
        return plain.numpy()
    except TypeError as exc:
        raise ValueError(f"torch dtype {plain.dtype} has no numpy equivalent and cannot be checkpointed") from exc


def writable_view(tensor: Any) -> NDArray[Any] | None:
    """A numpy view restore can write into, or ``None`` (GPU, non-contiguous, ...)."""
    if tensor.device.type != "cpu" or tensor.layout != torch.strided or not tensor.is_contiguous():
        return None
    try:
        return tensor_to_numpy(tensor)
    except ValueError:
        return None


def numpy_to_tensor(array: NDArray[Any]) -> Any:
    """A CPU tensor sharing ``array``'s memory (copied only if not writeable/contiguous)."""
    if not array.flags.c_contiguous or not array.flags.writeable:
        array = np.array(array, copy=True, order="C")
    # numpy's void kind: ml_dtypes' types (whose arrays mean ml_dtypes is imported already)
    found = _from_twin(array.dtype) if array.dtype.kind == "V" else None
    if found is not None:
        dtype, view = found
        return torch.from_numpy(array.view(view)).view(dtype)
    return torch.from_numpy(array)


def copy_into(tensor: Any, array: NDArray[Any]) -> None:
    """Assign ``array`` to a tensor in place (GPU or non-contiguous targets)."""
    with torch.no_grad():
        tensor.copy_(numpy_to_tensor(array))


def tensor_meta(tensor: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and numpy dtype of a tensor, without touching its data."""
    twin = _twin(tensor.dtype)
    if twin is not None:
        return tuple(tensor.shape), twin[0]
    try:
        dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    except TypeError as exc:
        raise ValueError(f"torch dtype {tensor.dtype} has no numpy equivalent") from exc
    return tuple(tensor.shape), dtype


class TorchGeneratorAdapter(StateAdapter):
    """``torch.Generator``: its state is a uint8 tensor (``get_state`` / ``set_state``)."""

    name = "torch_generator"

    def matches(self, obj: object) -> bool:
        return isinstance(obj, torch.Generator)

    def get_state(self, obj: Any) -> Any:
        return {"state": obj.get_state()}

    def set_state(self, obj: Any, state: Any) -> None:
        value = state["state"]
        obj.set_state(value if isinstance(value, torch.Tensor) else numpy_to_tensor(np.asarray(value)))

    def check(self, obj: Any, stored_keys: set[object], path: str) -> None:
        if stored_keys != {"state"}:
            raise ValueError(f"{path!r}: stored torch.Generator state has keys {sorted(map(str, stored_keys))}")


def check_state_keys(obj: Any, stored_keys: set[object], path: str) -> None:
    """A module's ``load_state_dict`` is strict: refuse mismatched keys before restoring anything."""
    if not isinstance(obj, torch.nn.Module):
        return
    live = set(obj.state_dict().keys())
    if live != stored_keys:
        missing = sorted(map(str, live - stored_keys))
        unexpected = sorted(map(str, stored_keys - live))
        raise ValueError(f"{path!r}: the checkpoint's state_dict does not match the module "
                         f"(missing in checkpoint: {missing}; unexpected in checkpoint: {unexpected})")
