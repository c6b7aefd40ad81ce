"""Key paths: how a saved object's path segments (attribute names, dict keys, list indexes)
are encoded into the ``/``-joined key paths of an index, and decoded back.
"""

from __future__ import annotations

import re

from cloudckpt.errors import CheckpointFormatError


# ---------------------------------------------------------------------------- key paths
def encode_segment(key: object) -> str:
    """One path segment for a dict key, keeping its type.

    ``str`` keys are kept readable with ``~`` escapes (``~0`` = ``~``, ``~1`` = ``/``,
    ``~2`` = a leading ``#``, ``~3`` = the empty string); other key types get a ``#``
    tag: ``#0`` is the int 0 (PyTorch optimizers key their state by int), ``#true``,
    ``#null``, ``#f:0.5``. List and tuple items use plain decimal indexes (the node's
    type tells them apart).

    Raises:
        ValueError: for key types that cannot round-trip (tuples, objects, ...).
    """
    if isinstance(key, str):
        if key == "":
            return "~3"
        text = key.replace("~", "~0").replace("/", "~1")
        return "~2" + text[1:] if text.startswith("#") else text
    if isinstance(key, bool):
        return "#true" if key else "#false"
    if isinstance(key, int):
        return f"#{key}"
    if key is None:
        return "#null"
    if isinstance(key, float):
        return f"#f:{key!r}"
    raise ValueError(f"dict keys must be str, int, float, bool or None to be checkpointed, "
                     f"got {type(key).__name__} key {key!r}")


_INT_RE = re.compile(r"-?[0-9]{1,400}")
INDEX_SEGMENT = re.compile(r"0|[1-9][0-9]{0,11}")


def decode_segment(segment: str) -> object:
    """Inverse of ``encode_segment``; ``CheckpointFormatError`` on anything else."""
    if segment.startswith("#"):
        body = segment[1:]
        if body == "true":
            return True
        if body == "false":
            return False
        if body == "null":
            return None
        if body.startswith("f:"):
            try:
                return float(body[2:])
            except ValueError:
                raise CheckpointFormatError(f"bad float key segment {segment!r}") from None
        if _INT_RE.fullmatch(body):
            return int(body)
        raise CheckpointFormatError(f"bad typed key segment {segment!r}")
    if segment == "~3":
        return ""
    if not segment:
        raise CheckpointFormatError("empty key segment")
    out = []
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch == "/":
            raise CheckpointFormatError(f"unescaped '/' in key segment {segment!r}")
        if ch == "~":
            code = segment[i + 1:i + 2]
            if code == "0":
                out.append("~")
            elif code == "1":
                out.append("/")
            elif code == "2" and i == 0:
                out.append("#")
            else:
                raise CheckpointFormatError(f"bad escape in key segment {segment!r}")
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def join_path(parent: str, segment: str) -> str:
    """Child path; the root node's path is ``""``."""
    return f"{parent}/{segment}" if parent else segment


def parent_path(path: str) -> tuple[str, str]:
    """``(parent, last segment)`` of a non-root path."""
    if "/" in path:
        parent, seg = path.rsplit("/", 1)
        return parent, seg
    return "", path
