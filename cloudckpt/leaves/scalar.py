"""numpy scalars (``numpy.float32(1.5)``): immutable, so restore replaces them through their container."""

from __future__ import annotations

from typing import Any

import numpy as np

from cloudckpt.leaves.base import (
    ArrayLeaf,
    Builder,
    LeafKind,
    LeafPlan,
    Setter,
    array_entry,
    check_array,
    host_array,
    mismatch,
)


class NumpyScalarKind(LeafKind):
    """``numpy.generic``: a 0-d array on disk, a numpy scalar again when restored or built."""

    name = "numpy_scalar"
    pytype = "numpy_scalar"
    stateful = False
    plain = True

    def matches(self, value: object) -> bool:
        return isinstance(value, np.generic)

    def collect(self, value: Any, path: str) -> ArrayLeaf:
        return ArrayLeaf(host_array(np.asarray(value), path), "numpy_scalar")

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        entry = array_entry(plan, live)
        if entry.pytype != "numpy_scalar" or setter is None:
            raise mismatch(plan, live)
        check_array(plan, entry, (), np.asarray(live).dtype)
        dest = plan.read_new()
        plan.then(lambda: setter(dest[()]))

    def build(self, plan: LeafPlan) -> Builder:
        dest = plan.read_built()
        return lambda: dest[()]


NUMPY_SCALAR = NumpyScalarKind()
