"""``cloudckpt.Variable``: its one owned array is written and restored in place.

A fresh build (no live ``Variable``) gives a numpy array, as ``cloudckpt.load`` always has.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloudckpt.leaves.base import (
    ArrayLeaf,
    LeafKind,
    LeafPlan,
    Setter,
    array_entry,
    check_array,
    host_array,
    read_or_copy,
)
from cloudckpt.trackable import Variable


class VariableKind(LeafKind):
    """``cloudckpt.Variable`` (not inside an adapter's state: nothing there would restore into it)."""

    name = "variable"
    pytype = "variable"
    in_state = False

    def matches(self, value: object) -> bool:
        return isinstance(value, Variable)

    def collect(self, value: Any, path: str) -> ArrayLeaf:
        return ArrayLeaf(host_array(value._buffer(), path), "variable")

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        entry = array_entry(plan, live)
        check_array(plan, entry, live.shape, live.dtype)
        buffer = live._buffer()
        read_or_copy(plan, buffer, lambda dest: np.copyto(buffer, dest))


VARIABLE = VariableKind()
