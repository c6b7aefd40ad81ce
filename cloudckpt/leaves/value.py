"""Python values (``None``, bool, int, float, str): JSON inside the index, replaced on restore."""

from __future__ import annotations

import functools
from typing import Any

from cloudckpt.format import ValueEntry, encode_value
from cloudckpt.leaves.base import Builder, LeafEntry, LeafKind, LeafPlan, Setter, mismatch


class ValueKind(LeafKind):
    """A JSON leaf: no bytes to read; restore hands the stored value to the container's setter."""

    name = "value"
    stateful = False
    plain = True

    def matches(self, value: object) -> bool:
        return value is None or isinstance(value, (bool, int, float, str))

    def collect(self, value: Any, path: str) -> ValueEntry:
        return encode_value(value)

    def restore(self, plan: LeafPlan, live: Any, setter: Setter | None) -> None:
        entry = plan.entry
        if not isinstance(entry, ValueEntry) or setter is None:
            raise mismatch(plan, live)
        plan.then(functools.partial(setter, entry.value))

    def builds(self, entry: LeafEntry) -> bool:
        return isinstance(entry, ValueEntry)

    def build(self, plan: LeafPlan) -> Builder:
        entry = plan.entry
        assert isinstance(entry, ValueEntry)
        return functools.partial(_identity, entry.value)


def _identity(value: Any) -> Any:
    return value


VALUE = ValueKind()
