"""Opaque bytes (pytype ``bytes``): byte strings stored as 1-D uint8, handed back as ``bytes``.

Written only by integrations (torch.distributed.checkpoint's serialized non-tensor items
go straight to the save pipeline); no live value is of this kind, so it only builds.
"""

from __future__ import annotations

from typing import Any

from cloudckpt.leaves.base import Builder, Collected, LeafKind, LeafPlan, Setter, mismatch


class OpaqueBytesKind(LeafKind):
    """Builds ``bytes`` from a ``bytes`` entry, never interpreting them; claims no live value."""

    name = "bytes"
    pytype = "bytes"

    def matches(self, value: object) -> bool:
        return False

    def collect(self, value: Any, path: str) -> Collected:
        raise TypeError("opaque bytes are written by integrations, never collected from a live value")

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        raise mismatch(plan, live)

    def build(self, plan: LeafPlan) -> Builder:
        return plan.read_built().tobytes


OPAQUE_BYTES = OpaqueBytesKind()
