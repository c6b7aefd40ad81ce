"""torch tensors: written from a numpy view of their memory, restored into it in place.

A tensor off the CPU (CUDA) has no numpy view: ``collect`` hands the pipeline a
``DeviceArray`` whose copier moves its bytes in batches (``cloudckpt.adapters.torch_device``),
and a restore into it streams through bounce buffers (``LeafPlan.read_to_device``) - never
``tensor.cpu()`` per tensor, never a temporary of the whole tensor on either side.

Torch itself is imported by ``cloudckpt.adapters.torch`` (the conversions, shared with
the DCP and DTensor integrations), reached only through ``_torch()`` - and only once a
value whose type comes from torch is met, so ``import cloudckpt`` never imports torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from cloudckpt.format import dtype_name, parse_dtype
from cloudckpt.leaves.base import (
    ArrayLeaf,
    Builder,
    LeafKind,
    LeafPlan,
    Setter,
    array_entry,
    check_array,
    display_path,
    host_array,
    refuse,
)


def _torch() -> ModuleType:
    """``cloudckpt.adapters.torch`` (which imports torch), imported on first need."""
    return importlib.import_module("cloudckpt.adapters.torch")


def _device() -> ModuleType:
    """``cloudckpt.adapters.torch_device`` (device tensors and their copiers), imported on first need."""
    return importlib.import_module("cloudckpt.adapters.torch_device")


class TorchTensorKind(LeafKind):
    """``torch.Tensor`` (dense; a meta tensor is refused both ways: it has no data)."""

    name = "tensor"
    pytype = "tensor"

    def matches(self, value: object) -> bool:
        if type(value).__module__.split(".", 1)[0] != "torch":
            return False
        return bool(_torch().is_tensor(value))

    def collect(self, value: Any, path: str) -> ArrayLeaf:
        device = self._device_array(value, path)
        if device is not None:
            return ArrayLeaf(device, "tensor")
        try:
            array = _torch().tensor_to_numpy(value)
        except ValueError as exc:
            raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None
        return ArrayLeaf(host_array(array, path), "tensor")

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        torch_adapter = _torch()
        entry = array_entry(plan, live)
        shape, dtype = torch_adapter.tensor_meta(live)
        check_array(plan, entry, shape, dtype)
        self._refuse_without_data(plan, live)
        device = self._device_array(live, plan.path)
        if device is not None:
            plan.read_to_device(device)
            return
        view = torch_adapter.writable_view(live)
        if view is not None:
            plan.read_into(view)
        else:
            dest = plan.read_new()
            plan.then(lambda: torch_adapter.copy_into(live, dest))

    def build_into(self, plan: LeafPlan, template: Any) -> Builder | None:
        """Read into the template's memory (a module's parameter) when it is a writable CPU view."""
        torch_adapter = _torch()
        entry = array_entry(plan, template)
        shape, dtype = torch_adapter.tensor_meta(template)
        check_array(plan, entry, shape, dtype)
        self._refuse_without_data(plan, template)
        device = self._device_array(template, plan.path)
        if device is not None:
            plan.read_to_device(device)
            return lambda: template
        view = torch_adapter.writable_view(template)
        if view is not None and view.dtype == parse_dtype(entry.dtype):
            plan.read_into(view)
            return lambda: template
        return None

    def build(self, plan: LeafPlan) -> Builder:
        dest = plan.read_built()
        return lambda: _torch().numpy_to_tensor(dest)

    @staticmethod
    def _device_array(tensor: Any, path: str) -> Any:
        """``tensor`` as a ``DeviceArray`` when a copier serves it (off the CPU), else ``None``."""
        try:
            array = _device().device_array(tensor)
            if array is not None:
                dtype_name(array.dtype)  # a dtype the format cannot name is refused here, naming the key
            return array
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot checkpoint {display_path(path)}: {exc}") from None

    @staticmethod
    def _refuse_without_data(plan: LeafPlan, tensor: Any) -> None:
        """A tensor with no storage (meta) cannot take the stored bytes: refuse before anything is restored."""
        problem = _torch().no_data(tensor)
        if problem is not None:
            raise refuse(plan, problem)


TORCH_TENSOR = TorchTensorKind()
