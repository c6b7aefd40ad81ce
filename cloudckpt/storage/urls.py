"""Checkpoint paths and URLs as text: which backend a URL means, and splitting/joining them.

Only the public API boundary (``cloudckpt.storage.registry``) and the CLI use these;
below it, code passes ``Storage`` objects and names, never URLs.
"""

from __future__ import annotations

import os

from cloudckpt.errors import InvalidURLError


def url_scheme(url: str | os.PathLike[str]) -> str:
    """``"s3"``, ``"gs"``, ``"file"`` (for plain paths too), or another fsspec protocol."""
    text = os.fspath(url)
    if "://" not in text:
        return "file"
    return text.split("://", 1)[0].lower()


def join_url(directory: str | os.PathLike[str], name: str) -> str:
    """``directory`` + ``/`` + ``name``, for URLs and local paths alike."""
    text = os.fspath(directory)
    if "://" in text:
        return f"{text.rstrip('/')}/{name}"
    return os.path.join(text, name)


def split_url(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Split a checkpoint path into (directory URL, last component).

    ``"s3://b/run/ckpt-7"`` -> ``("s3://b/run", "ckpt-7")``; ``"ckpt-7"`` -> ``(".", "ckpt-7")``.
    A checkpoint is a prefix, so its objects are ``<name>.index`` etc. in that directory.
    """
    text = os.fspath(path).rstrip("/")
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if "/" not in rest:
            raise InvalidURLError(f"{text!r} names a bucket, not a checkpoint path inside it", text)
        parent, name = rest.rsplit("/", 1)
        return f"{scheme}://{parent}", name
    parent, name = os.path.split(text)
    if not name:
        raise InvalidURLError(f"{text!r} does not name a checkpoint", text)
    return parent or ".", name
