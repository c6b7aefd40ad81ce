"""Opaque bytes (pytype ``bytes``): byte strings stored as 1-D uint8, handed back as ``bytes``.

Written by integrations (torch.distributed.checkpoint's serialized non-tensor items go
straight to the save pipeline) and by live ``bytes`` values inside a saved structure (a
Lightning checkpoint's callback state may hold some). ``bytes`` are immutable, so restore
replaces them through their container, like a Python value; a bare ``bytes`` is no
``Checkpoint`` dependency (``stateful`` is false, as for a bare int).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloudckpt.leaves.base import ArrayLeaf, Builder, LeafKind, LeafPlan, Setter, array_entry, mismatch


class OpaqueBytesKind(LeafKind):
    """``bytes`` to and from a ``bytes`` entry, never interpreting them."""

    name = "bytes"
    pytype = "bytes"
    stateful = False
    plain = True

    def matches(self, value: object) -> bool:
        return type(value) is bytes

    def collect(self, value: Any, path: str) -> ArrayLeaf:
        return ArrayLeaf(np.frombuffer(value, dtype=np.uint8), "bytes", frozen=True)  # immutable: never staged

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        entry = array_entry(plan, live)
        if entry.pytype != "bytes" or setter is None:
            raise mismatch(plan, live)
        dest = plan.read_built()
        plan.then(lambda: setter(dest.tobytes()))

    def build(self, plan: LeafPlan) -> Builder:
        return plan.read_built().tobytes


OPAQUE_BYTES = OpaqueBytesKind()
