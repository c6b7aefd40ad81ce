"""numpy arrays: written from their own memory, restored into it in place."""

from __future__ import annotations

from typing import Any

import numpy as np

from cloudckpt.format import parse_dtype
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
    mismatch,
    read_or_copy,
)


class NdarrayKind(LeafKind):
    """``numpy.ndarray`` (object arrays refused: they hold Python objects, which would need pickling)."""

    name = "ndarray"
    pytype = "ndarray"

    def matches(self, value: object) -> bool:
        return isinstance(value, np.ndarray)

    def collect(self, value: Any, path: str) -> ArrayLeaf:
        if value.dtype == object:
            raise ValueError(f"cannot checkpoint {display_path(path)}: object arrays are refused "
                             f"(they hold Python objects, which would need pickling)")
        return ArrayLeaf(host_array(np.asarray(value), path), "ndarray")

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        entry = array_entry(plan, live)
        check_array(plan, entry, live.shape, live.dtype)
        if not live.flags.writeable:
            raise mismatch(plan, "a read-only numpy array")
        read_or_copy(plan, live, lambda dest: np.copyto(live, dest))

    def build_into(self, plan: LeafPlan, template: Any) -> Builder | None:
        """Read into the template's own array when its layout allows (else a fresh array)."""
        entry = array_entry(plan, template)
        check_array(plan, entry, template.shape, template.dtype)
        if template.dtype == parse_dtype(entry.dtype) and template.flags.c_contiguous and template.flags.writeable:
            plan.read_into(template)
            return lambda: template
        return None


NDARRAY = NdarrayKind()
