"""Session-wide servers and per-test stores.

Servers start once per session, lazily (a test run that needs no S3 starts no SeaweedFS),
on free 127.0.0.1 ports, and are stopped by PID at session end (see tests/servers.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import servers

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
