"""The install extras that bring each cloud SDK, and the error when one is missing.

Why extras: a user of local disk or of GCS alone should not install boto3, nor an S3 user
google-cloud-storage. ``pip install 'cloudckpt[s3]'``, ``'cloudckpt[gcs]'`` or
``'cloudckpt[all]'`` adds them; a URL that needs a missing one raises
``MissingDependencyError`` (an ``ImportError``) that says which command fixes it.
"""

from __future__ import annotations

from cloudckpt.errors import MissingDependencyError

#: extra -> (what it serves, the packages it installs).
EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3:// URLs", "boto3"),
    "gcs": ("gs:// URLs", "google-cloud-storage"),
}


def missing_extra(extra: str, cause: ImportError, url: str | None = None) -> MissingDependencyError:
    """The error for a backend whose SDK failed to import (``cause``), naming the extra."""
    serves, packages = EXTRAS[extra]
    where = f"{url!r}: " if url else ""
    missing = f" ({cause.name} is not installed)" if cause.name else f" ({cause})"
    return MissingDependencyError(
        f"{where}{serves} need {packages}{missing}: pip install 'cloudckpt[{extra}]' "
        f"(or 'cloudckpt[all]' for every backend)", url)
