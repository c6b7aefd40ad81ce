"""Session-wide servers and per-test stores.

Servers start once per session, lazily (a test run that needs no S3 starts no SeaweedFS),
on free 127.0.0.1 ports, and are stopped by PID at session end (see tests/servers.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import servers

from cloudckpt.storage import Storage, resolve

# Dummy credentials for the local servers: set before any SDK reads its environment so a
# developer's real credentials are never sent to (or logged by) a test server.
os.environ["AWS_ACCESS_KEY_ID"] = "cloudckpt-test"
os.environ["AWS_SECRET_ACCESS_KEY"] = "cloudckpt-test-secret"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_ENDPOINT_URL_S3", None)
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """A real S3 server: SeaweedFS ``weed mini``."""
    with servers.seaweedfs(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """moto in server mode: S3 as users emulate it in their own tests, plus IAM."""
    with servers.moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """fake-gcs-server; ``STORAGE_EMULATOR_HOST`` points at it for the whole session."""
    with servers.fake_gcs(tmp_path_factory.mktemp("fakegcs")) as server:
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
        try:
            yield server
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous


def unique_name(prefix: str = "t") -> str:
    """A DNS-valid unique bucket or prefix name (SeaweedFS refuses short or odd names)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def s3_bucket(seaweedfs: servers.Server) -> str:
    """A fresh bucket on SeaweedFS, one per test module."""
    name = unique_name("ckpt")
    servers.create_bucket(seaweedfs.endpoint, name)
    return name


@pytest.fixture(scope="module")
def s3_root(seaweedfs: servers.Server) -> Iterator[str]:
    """A fresh directory in a fresh SeaweedFS bucket, with ``AWS_ENDPOINT_URL`` set for the module
    (spawned ``torch.distributed`` processes inherit it)."""
    bucket = unique_name("dist")
    servers.create_bucket(seaweedfs.endpoint, bucket)
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = seaweedfs.endpoint
    try:
        yield f"s3://{bucket}/run-{uuid.uuid4().hex[:8]}"
    finally:
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous


@pytest.fixture(scope="module")
def gcs_bucket(fake_gcs: servers.Server) -> str:
    """A fresh bucket on fake-gcs-server, one per test module."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    name = unique_name("ckpt")
    gcs.Client(project="test", credentials=AnonymousCredentials()).create_bucket(name)  # type: ignore[no-untyped-call]
    return name


@pytest.fixture(params=["local", "s3", "gcs"])
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh checkpoint directory URL on each backend."""
    kind = request.param
    if kind == "local":
        yield str(tmp_path)
        return
    if kind == "s3":
        server: servers.Server = request.getfixturevalue("seaweedfs")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        yield f"s3://{request.getfixturevalue('s3_bucket')}/run-{uuid.uuid4().hex[:8]}"
        return
    yield f"gs://{request.getfixturevalue('gcs_bucket')}/run-{uuid.uuid4().hex[:8]}"


def storage_of(root: str) -> Storage:
    """The storage of a ``root`` directory (the one the library itself resolves to)."""
    return resolve(f"{root}/x").storage
