"""Where tensorstore finds an Orbax checkpoint: a cloudckpt ``Storage`` as a tensorstore kvstore spec.

Orbax writes its arrays through tensorstore (OCDBT, a B-tree of keys over ``d/`` data files),
and the only reader of OCDBT is tensorstore itself, which reaches storage through its own
drivers - so the array bytes of an Orbax checkpoint cannot travel through cloudckpt's
``Storage``. What can be done is to point tensorstore's driver at the same place the
``Storage`` names: local disk (``file``), S3 and S3-compatible stores (``s3``, with the
endpoint and region the boto3 client uses) and GCS (``gcs``; an emulator named by
``STORAGE_EMULATOR_HOST`` is handed to tensorstore as ``TENSORSTORE_GCS_HTTP_URL``, the one
way tensorstore takes one). Credentials are tensorstore's own default chains (environment,
profile, metadata server), never copied from the SDK clients. Any other ``Storage`` (fsspec)
is refused with an error naming the checkpoint.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from cloudckpt.errors import CheckpointFormatError, MissingDependencyError
from cloudckpt.storage import Storage

#: tensorstore's name for the GCS endpoint override (read each time a gcs kvstore is opened).
TS_GCS_URL = "TENSORSTORE_GCS_HTTP_URL"
_set_by_us: list[str] = []  # the value we last put into TS_GCS_URL (replaced when the emulator moves)


def tensorstore() -> ModuleType:
    """The ``tensorstore`` module, or a MissingDependencyError naming the install extra."""
    try:
        import tensorstore as ts
    except ImportError as exc:
        raise MissingDependencyError(
            f"reading an Orbax checkpoint needs tensorstore ({exc.name or exc} is not installed): "
            "pip install 'cloudckpt[orbax]'") from exc
    return ts


def _s3_spec(storage: Storage, prefix: str) -> dict[str, Any]:
    client = storage.client  # type: ignore[attr-defined]
    spec: dict[str, Any] = {"driver": "s3", "bucket": storage.bucket, "path": prefix}  # type: ignore[attr-defined]
    endpoint = str(client.meta.endpoint_url or "")
    if endpoint and "amazonaws.com" not in endpoint:
        spec["endpoint"] = endpoint  # an S3-compatible store (SeaweedFS, MinIO); AWS itself is found by region
    if client.meta.region_name:
        spec["aws_region"] = str(client.meta.region_name)
    return spec


def _gcs_spec(storage: Storage, prefix: str) -> dict[str, Any]:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    current = os.environ.get(TS_GCS_URL)
    if emulator and (current is None or current in _set_by_us):
        os.environ[TS_GCS_URL] = emulator
        _set_by_us[:] = [emulator]
    return {"driver": "gcs", "bucket": storage.bucket_name, "path": prefix}  # type: ignore[attr-defined]


def kvstore_spec(storage: Storage, directory: str) -> dict[str, Any]:
    """The tensorstore kvstore spec of ``directory`` (a key prefix of ``storage``), ending in ``/``.

    Raises:
        CheckpointFormatError: ``storage`` is a backend tensorstore has no driver for.
    """
    from cloudckpt.storage.local import LocalStorage

    relative = directory.strip("/") + "/"
    if isinstance(storage, LocalStorage):
        return {"driver": "file", "path": f"{storage.root / relative.rstrip('/')}/"}
    if "s3" in storage.schemes:  # S3Storage, told by scheme: importing it would import boto3
        return _s3_spec(storage, storage._prefix + relative)
    if "gs" in storage.schemes:
        return _gcs_spec(storage, storage._prefix + relative)
    raise CheckpointFormatError(
        f"{storage.url_for(directory)} is an Orbax checkpoint on a {type(storage).__name__}, which tensorstore "
        "(Orbax's reader) cannot reach: copy it to local disk, S3 or GCS first")
