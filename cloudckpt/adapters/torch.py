"""PyTorch: tensors to numpy and back (zero-copy where possible), generators, strict modules.

The only module that imports torch. Tensors travel as numpy arrays sharing their memory
(``Tensor.numpy()`` / ``torch.from_numpy``); dtypes numpy lacks go through a same-width
integer view and come out as their ``ml_dtypes`` twin (``torch.bfloat16`` <->
``ml_dtypes.bfloat16``), so the stored bytes and the dtype name are both faithful.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch
from numpy.typing import NDArray

from cloudckpt.adapters import StateAdapter

#: torch dtypes numpy lacks -> (their ml_dtypes twin, a same-width integer dtype to view through).
_VIA_VIEW: dict[torch.dtype, tuple[np.dtype[Any], torch.dtype]] = {
    torch.bfloat16: (np.dtype(ml_dtypes.bfloat16), torch.int16),
}
for _torch_name, _ml_name in (("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2"),
                              ("float8_e4m3fnuz", "float8_e4m3fnuz"), ("float8_e5m2fnuz", "float8_e5m2fnuz")):
    if hasattr(torch, _torch_name) and hasattr(ml_dtypes, _ml_name):
        _VIA_VIEW[getattr(torch, _torch_name)] = (np.dtype(getattr(ml_dtypes, _ml_name)), torch.uint8)

_FROM_NUMPY_VIEW: dict[np.dtype[Any], tuple[torch.dtype, np.dtype[Any]]] = {
    ml: (td, np.dtype(torch.empty(0, dtype=view).numpy().dtype)) for td, (ml, view) in _VIA_VIEW.items()
}


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
    if plain.dtype in _VIA_VIEW:
        ml, view = _VIA_VIEW[plain.dtype]
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
    if array.dtype in _FROM_NUMPY_VIEW:
        dtype, view = _FROM_NUMPY_VIEW[array.dtype]
        return torch.from_numpy(array.view(view)).view(dtype)
    return torch.from_numpy(array)


def copy_into(tensor: Any, array: NDArray[Any]) -> None:
    """Assign ``array`` to a tensor in place (GPU or non-contiguous targets)."""
    with torch.no_grad():
        tensor.copy_(numpy_to_tensor(array))


def tensor_meta(tensor: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and numpy dtype of a tensor, without touching its data."""
    if tensor.dtype in _VIA_VIEW:
        return tuple(tensor.shape), _VIA_VIEW[tensor.dtype][0]
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
