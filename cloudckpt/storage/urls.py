"""Checkpoint paths and URLs: which backend a text names, and how it splits and joins.

Why one module: every place a URL enters (the API, the manager, the CLI) must read it the
same way, and must refuse the same typos. A mistyped ``s3:/bucket/run`` (one slash) or an
``f"s3://{bucket}/run"`` whose ``bucket`` is empty used to be taken for a local path and
silently wrote a directory called ``s3:`` into the working directory; here it is an
``InvalidURLError`` naming the text.

What counts as a typo, and what stays a local path:

* ``word:/rest`` (one slash) and ``word:`` / ``word:rest`` where ``word`` is a storage
  protocol (``s3``, ``gs``, ``file``, ``memory``, any protocol fsspec knows): a URL
  missing a slash. Refused.
* ``s3://``, ``s3:///key``, ``gs://`` ...: a cloud URL without a bucket. Refused.
* ``C:\\run`` / ``C:/run`` (a one-letter drive), ``run:v2/ckpt`` (a word that is no
  protocol, no slash after the colon) and ``runs/a:b/ckpt`` (a colon further in): local
  paths, as they always were.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from cloudckpt.errors import InvalidURLError

#: Schemes whose URLs name a bucket first (``scheme://bucket/prefix``), and what they are.
BUCKET_SCHEMES = {"s3": "S3", "s3a": "S3", "gs": "GCS", "gcs": "GCS"}
#: Schemes cloudckpt serves itself (fsspec serves the others).
OWN_SCHEMES = frozenset({"file", *BUCKET_SCHEMES})

#: ``scheme:`` at the start of a text: RFC 3986's scheme grammar, two characters at least,
#: so a Windows drive letter (``C:``) is never one.
_SCHEME_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):")


@dataclass(frozen=True, slots=True)
class BucketURL:
    """``scheme://bucket/prefix`` taken apart.

    Attributes:
        scheme: the scheme as written, lower-cased (``s3``, ``s3a``, ``gs``, ``gcs``).
        bucket: the bucket name (never empty).
        prefix: the key prefix inside the bucket: ``""`` or ending in ``/``.
    """

    scheme: str
    bucket: str
    prefix: str

    def root(self, scheme: str | None = None) -> str:
        """The URL without a trailing slash, optionally under another (canonical) scheme."""
        return f"{scheme or self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def check_url(url: str | os.PathLike[str]) -> str:
    """``url`` as text, or ``InvalidURLError`` if it looks like a URL typo (see the module doc)."""
    text = os.fspath(url)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme.lower() in BUCKET_SCHEMES:
            parse_bucket_url(text)
        elif not scheme:
            raise InvalidURLError(f"{text!r} has no scheme before '://'", text)
        return text
    match = _SCHEME_PREFIX.match(text)
    if match is None:
        return text
    word, after = match.group(1), text[match.end():]
    if after.startswith("/"):
        meant = f"{word}://{after}" if word.lower() == "file" else f"{word}://{after.lstrip('/')}"
        raise InvalidURLError(
            f"{text!r} looks like a URL missing a slash (did you mean {meant!r}?); "
            f"for a local path starting with {word + ':'!r}, write ./{text}", text)
    if _is_protocol(word):
        raise InvalidURLError(
            f"{text!r} looks like a {word}:// URL missing its '//' (did you mean {word}://{after}?)", text)
    return text


def url_scheme(url: str | os.PathLike[str]) -> str:
    """``"s3"``, ``"gs"``, ``"file"`` (for plain paths too), or another fsspec protocol.

    Raises:
        InvalidURLError: the text looks like a URL typo (``s3:/bucket``, ``s3://``).
    """
    text = check_url(url)
    if "://" not in text:
        return "file"
    return text.split("://", 1)[0].lower()


def parse_bucket_url(url: str) -> BucketURL:
    """``s3://bucket/a/b`` -> ``BucketURL("s3", "bucket", "a/b/")``, for every bucket store.

    Raises:
        InvalidURLError: not a bucket URL, no bucket (``s3://``, ``s3:///key``), or an
            empty, ``.`` or ``..`` segment in the prefix.
    """
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    kind = BUCKET_SCHEMES.get(scheme)
    if not sep or kind is None:
        raise InvalidURLError(f"{text!r} is not a bucket URL (expected s3://bucket/prefix or gs://bucket/prefix)",
                              text)
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidURLError(f"{kind} URL {text!r} names no bucket (expected {scheme}://bucket/prefix)", text)
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise InvalidURLError(f"{kind} URL {text!r} has an empty, '.' or '..' path segment", text)
    return BucketURL(scheme, bucket, f"{prefix}/" if prefix else "")


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

    Raises:
        InvalidURLError: a URL typo (``s3:/b/run``, ``s3:///ckpt``), a bare bucket, or a
            path that names no checkpoint.
    """
    text = check_url(path).rstrip("/")
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


def _is_protocol(word: str) -> bool:
    return word.lower() in OWN_SCHEMES or word.lower() in _fsspec_protocols()


@lru_cache(maxsize=1)
def _fsspec_protocols() -> frozenset[str]:
    """Every protocol fsspec knows (imported only when a text starts like ``word:``)."""
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:  # pragma: no cover - fsspec is a core dependency
        return frozenset()
    return frozenset(name.lower() for name in (*known_implementations, *registry))
