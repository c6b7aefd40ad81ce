"""Adapters: objects whose state is saved and restored as one structure.

Internal: not a public path (docs/architecture.md lists those), so it may move between releases.

A PyTorch module, an optimizer, a random-number generator: none of them can be restored
attribute by attribute, but each can hand out its state (``state_dict()``,
``bit_generator.state``, ``getstate()``) and take a whole new one back. An adapter names
that pair of calls; the graph walker stores the structure under the object's path with
the adapter's name, and restore rebuilds the structure and hands it back.

Adapters make *structures* (a node with the adapter's name); single values are leaves
(``cloudckpt.leaves``). Only ``cloudckpt.adapters.torch`` imports torch, and only when an
object from torch is actually met (detected by its type's module name: here, and by the
torch tensor's leaf kind), so ``import cloudckpt`` stays light.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np


class StateAdapter:
    """How to get and set the whole state of one kind of object.

    Subclasses override ``matches``, ``get_state`` and ``set_state``; ``check`` lets an
    adapter refuse a stored structure *before* anything is restored (validation first).
    """

    name: str = ""

    def matches(self, obj: object) -> bool:
        raise NotImplementedError

    def get_state(self, obj: Any) -> Any:
        raise NotImplementedError

    def set_state(self, obj: Any, state: Any) -> None:
        raise NotImplementedError

    def check(self, obj: Any, stored_keys: set[object], path: str) -> None:
        """Raise ``ValueError`` if ``obj`` cannot take a state with these top-level keys."""


class NumpyGeneratorAdapter(StateAdapter):
    """``numpy.random.Generator`` and the legacy ``RandomState``, via the bit generator state."""

    name = "numpy_generator"

    def matches(self, obj: object) -> bool:
        return isinstance(obj, (np.random.Generator, np.random.RandomState, np.random.BitGenerator))

    def _bit_generator(self, obj: Any) -> Any:
        if isinstance(obj, np.random.RandomState):
            return obj._bit_generator
        return obj.bit_generator if isinstance(obj, np.random.Generator) else obj

    def get_state(self, obj: Any) -> Any:
        return dict(self._bit_generator(obj).state)

    def set_state(self, obj: Any, state: Any) -> None:
        self._bit_generator(obj).state = state


class PythonRandomAdapter(StateAdapter):
    """``random.Random``: the Mersenne Twister words as a uint64 array, not 625 JSON ints."""

    name = "python_random"

    def matches(self, obj: object) -> bool:
        return isinstance(obj, random.Random)

    def get_state(self, obj: Any) -> Any:
        version, internal, gauss_next = obj.getstate()
        return {"version": version, "internal": np.array(internal, dtype=np.uint64), "gauss_next": gauss_next}

    def set_state(self, obj: Any, state: Any) -> None:
        internal = tuple(int(x) for x in np.asarray(state["internal"]).tolist())
        obj.setstate((state["version"], internal, state["gauss_next"]))

    def check(self, obj: Any, stored_keys: set[object], path: str) -> None:
        if stored_keys != {"version", "internal", "gauss_next"}:
            raise ValueError(f"{path!r}: stored random.Random state has keys {sorted(map(str, stored_keys))}")


class StateDictAdapter(StateAdapter):
    """Anything with ``state_dict()`` and ``load_state_dict()`` (torch modules, optimizers, schedulers)."""

    name = "state_dict"

    def matches(self, obj: object) -> bool:
        return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))

    def get_state(self, obj: Any) -> Any:
        state = obj.state_dict()
        if not isinstance(state, Mapping):
            raise ValueError(f"{type(obj).__name__}.state_dict() returned {type(state).__name__}, not a mapping")
        return state

    def set_state(self, obj: Any, state: Any) -> None:
        obj.load_state_dict(state)

    def check(self, obj: Any, stored_keys: set[object], path: str) -> None:
        if _is_torch_object(obj):
            from cloudckpt.adapters import torch as torch_adapter
            torch_adapter.check_state_keys(obj, stored_keys, path)


def _is_torch_object(obj: object) -> bool:
    return type(obj).__module__.split(".", 1)[0] == "torch" or (
        "torch" in sys.modules and isinstance(obj, sys.modules["torch"].nn.Module))


def _torch_generator_adapter() -> StateAdapter:
    from cloudckpt.adapters.torch import TorchGeneratorAdapter
    return TorchGeneratorAdapter()


_BUILTIN: tuple[StateAdapter, ...] = (NumpyGeneratorAdapter(), PythonRandomAdapter())
_STATE_DICT = StateDictAdapter()


def adapter_for(obj: object) -> StateAdapter | None:
    """The adapter for ``obj``, or ``None`` if it is not an adapted kind of object."""
    for adapter in _BUILTIN:
        if adapter.matches(obj):
            return adapter
    if _is_torch_object(obj) and type(obj).__name__ == "Generator":
        generator = _torch_generator_adapter()
        if generator.matches(obj):
            return generator
    if _STATE_DICT.matches(obj):
        return _STATE_DICT
    return None
