"""Plain Python values as JSON that keeps their types: what DCP's ``planner_data`` holds, never pickled.

DCP's default planner records, per flattened key, the path back into the nested state
dict: ``{"optim.state.0.exp_avg": ("optim", "state", 0, "exp_avg")}``, a dict of tuples of
str and int. Plain JSON would turn the tuples into lists (and int dict keys into strings),
so this codec tags what JSON cannot say:

========================  ===============================================
Python                    JSON
========================  ===============================================
None, bool, int, str      themselves
float                     itself; ``{"$float": "nan" | "inf" | "-inf"}``
tuple                     an array
list                      ``{"$list": [...]}``
dict, str keys            an object (keys starting with ``$`` force the next form)
dict, other keys          ``{"$dict": [[key, value], ...]}``
========================  ===============================================

Anything else (an object a custom planner keeps there) is refused with a ``TypeError``
naming its type: the alternative would be pickle. Decoding is iterative and bounded in
depth (an index is untrusted input); a malformed value is a ``CheckpointFormatError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from cloudckpt.errors import CheckpointFormatError

#: Deepest nesting accepted either way (the default planner's data is 2 levels deep).
MAX_DEPTH = 64

_FLOAT_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` as type-keeping JSON (see the module docs).

    Raises:
        TypeError: a value of another type, or nesting deeper than ``MAX_DEPTH`` (a cycle);
            the message names ``where`` and the type.
    """
    if depth > MAX_DEPTH:
        raise TypeError(f"{where} is nested deeper than {MAX_DEPTH} levels (a cycle?)")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, tuple):
        return [encode_plain(v, where, depth + 1) for v in value]
    if isinstance(value, list):
        return {"$list": [encode_plain(v, where, depth + 1) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode_plain(v, where, depth + 1) for k, v in value.items()}
        return {"$dict": [[encode_plain(k, where, depth + 1), encode_plain(v, where, depth + 1)]
                          for k, v in value.items()]}
    raise TypeError(f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which cannot be stored "
                    f"without pickle (only None, bool, int, float, str, tuple, list and dict are)")


class _Build:
    """A container to assemble once its ``count`` decoded children are on the value stack."""

    __slots__ = ("count", "make")

    def __init__(self, count: int, make: Callable[[list[Any]], Any]) -> None:
        self.count = count
        self.make = make


def _make_dict(keys: list[str]) -> Callable[[list[Any]], Any]:
    return lambda values: dict(zip(keys, values, strict=True))


def _make_pairs(where: str) -> Callable[[list[Any]], Any]:
    def make(values: list[Any]) -> dict[Any, Any]:
        try:
            return dict(zip(values[0::2], values[1::2], strict=True))
        except TypeError:
            raise CheckpointFormatError(f"{where}: a $dict key is not hashable") from None
    return make


def decode_plain(doc: Any, where: str) -> Any:
    """The Python value of type-keeping JSON ``doc`` (iterative: no recursion on its depth).

    Raises:
        CheckpointFormatError: an unknown tag, a malformed tagged form, or nesting deeper
            than ``MAX_DEPTH``; the message names ``where``.
    """
    def fail(problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{where}: {problem}")

    values: list[Any] = []
    work: list[tuple[Any, int]] = [(doc, 0)]
    while work:
        item, depth = work.pop()
        if isinstance(item, _Build):
            cut = len(values) - item.count
            children = values[cut:]
            del values[cut:]
            values.append(item.make(children))
            continue
        if depth > MAX_DEPTH:
            raise fail(f"nested deeper than {MAX_DEPTH} levels")
        if item is None or isinstance(item, (bool, int, float, str)):
            values.append(item)
            continue
        if isinstance(item, list):
            children_of: list[Any] = item
            work.append((_Build(len(item), tuple), depth))
        elif isinstance(item, dict):
            tagged = len(item) == 1 and next(iter(item)).startswith("$")
            if not tagged:
                if any(k.startswith("$") for k in item):
                    raise fail("an object key starts with '$' outside a tagged form")
                children_of = list(item.values())
                work.append((_Build(len(item), _make_dict(list(item))), depth))
            else:
                tag, body = next(iter(item.items()))
                if tag == "$float":
                    if not isinstance(body, str) or body not in _FLOAT_NAMES:
                        raise fail(f"bad $float {body!r}")
                    values.append(_FLOAT_NAMES[body])
                    continue
                if tag == "$list" and isinstance(body, list):
                    children_of = body
                    work.append((_Build(len(body), list), depth))
                elif tag == "$dict" and isinstance(body, list):
                    if any(not isinstance(pair, list) or len(pair) != 2 for pair in body):
                        raise fail("$dict must hold [key, value] pairs")
                    children_of = [x for pair in body for x in pair]
                    work.append((_Build(len(children_of), _make_pairs(where)), depth))
                else:
                    raise fail(f"unknown or malformed tagged value {tag!r}")
        else:
            raise fail(f"unexpected {type(item).__name__}")
        work.extend((child, depth + 1) for child in reversed(children_of))
    assert len(values) == 1
    return values[0]
