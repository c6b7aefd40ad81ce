"""S3 backend against two real servers (SeaweedFS and moto), plus injected faults.

No boto3 mocks: every request reaches a real S3 server, through ``tests/faultproxy.py``
where a test needs the network to misbehave.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
import servers
from botocore.config import Config
from conftest import unique_name
from faultproxy import FaultProxy, Rule

from cloudckpt import open_storage
from cloudckpt.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BucketNotFoundError,
    InvalidURLError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    StorageError,
    TransientError,
)
from cloudckpt.storage import ReadRequest, Storage, TransferConfig, UpdateVersion
from cloudckpt.storage import s3 as s3mod
from cloudckpt.storage.base import TEMP_PREFIX, GiB, MiB
from cloudckpt.storage.s3 import S3Storage
from cloudckpt.testing.store_tests import CONTRACT_CONFIG, MULTIPART_SIZE, StorageContract, payload

pytestmark = pytest.mark.s3


# ---------------------------------------------------------------------- helpers and fixtures
def admin_client(endpoint: str, **config: Any) -> Any:
    """A plain boto3 client for set-up and for looking behind the backend's back."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required", **config))


def make_bucket(endpoint: str) -> str:
    name = unique_name("cloudckpt")
    admin_client(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def weed_bucket(seaweedfs: servers.Server) -> str:
    return make_bucket(seaweedfs.endpoint)


@pytest.fixture(scope="module")
def moto_bucket(moto: servers.Server) -> str:
    return make_bucket(moto.endpoint)


@pytest.fixture(params=["seaweedfs", "moto"])
def server(request: pytest.FixtureRequest) -> tuple[servers.Server, str]:
    """Each of the two S3 servers with its bucket, for tests that should pass on both."""
    name = request.param
    return request.getfixturevalue(name), request.getfixturevalue("weed_bucket" if name == "seaweedfs"
                                                                  else "moto_bucket")


def fresh_store(endpoint: str, bucket: str, **options: Any) -> S3Storage:
    """A store under a unique prefix, so tests share the bucket but never each other's keys."""
    options.setdefault("config", CONTRACT_CONFIG)
    return S3Storage(f"s3://{bucket}/{unique_name('t')}", endpoint_url=endpoint, **options)


@pytest.fixture
def any_store(server: tuple[servers.Server, str]) -> Iterator[S3Storage]:
    store = fresh_store(server[0].endpoint, server[1])
    yield store
    store.close()


class TestSeaweedFS(StorageContract):
    @pytest.fixture
    def store(self, seaweedfs: servers.Server, weed_bucket: str) -> Iterator[Storage]:
        store = fresh_store(seaweedfs.endpoint, weed_bucket)
        yield store
        store.close()


class TestMoto(StorageContract):
    @pytest.fixture
    def store(self, moto: servers.Server, moto_bucket: str) -> Iterator[Storage]:
        store = fresh_store(moto.endpoint, moto_bucket)
        yield store
        store.close()


# ---------------------------------------------------------------------- multipart
def test_multipart_really_happened(any_store: S3Storage) -> None:
    meta = any_store.put("big", payload(MULTIPART_SIZE))
    assert meta.version is not None and meta.version.endswith("-3")  # 5 + 5 + 3 MiB
    assert any_store.head("big").version == meta.version


def test_failed_multipart_leaves_no_incomplete_upload(any_store: S3Storage,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = s3mod._S3Multipart.upload_part
    uploaded: list[int] = []

    def failing(self: s3mod._S3Multipart, index: int, data: list[memoryview]) -> None:
        if index == 2:
            raise OSError(28, "No space left on device")  # not transient: no retry
        real(self, index, data)
        uploaded.append(index)

    monkeypatch.setattr(s3mod._S3Multipart, "upload_part", failing)
    with pytest.raises(OSError, match="No space left"):
        any_store.put("big", payload(MULTIPART_SIZE))
    assert sorted(uploaded) == [0, 1]  # real parts went up before the failure
    assert any_store.list_multipart_uploads() == []
    assert not any_store.exists("big")


def test_stale_uploads_are_listed_and_aborted(any_store: S3Storage) -> None:
    """What cleanup tooling does after a SIGKILL skipped the abort."""
    admin = admin_client(any_store.client.meta.endpoint_url)
    full_key = any_store._prefix + "ckpt-1.data"
    upload_id = admin.create_multipart_upload(Bucket=any_store.bucket, Key=full_key)["UploadId"]
    admin.upload_part(Bucket=any_store.bucket, Key=full_key, UploadId=upload_id, PartNumber=1, Body=b"x" * 1000)
    pending = any_store.list_multipart_uploads("ckpt-")
    assert [(p.key, p.upload_id) for p in pending] == [("ckpt-1.data", upload_id)]
    assert pending[0].initiated.tzinfo is not None
    any_store.abort_multipart_upload("ckpt-1.data", upload_id)
    any_store.abort_multipart_upload("ckpt-1.data", upload_id)  # already gone: fine
    assert any_store.list_multipart_uploads() == []


def test_part_size_fits_the_part_limit_and_threshold_is_clamped() -> None:
    store = S3Storage("s3://bucket/p", config=TransferConfig(part_size=1 * MiB, multipart_threshold=64 * GiB))
    assert store.config.multipart_threshold == 5 * GiB
    assert store._part_size(100 * MiB) == 5 * MiB
    assert store._part_size(1000 * GiB) == -(-1000 * GiB // 10_000)
    assert store._part_size(10_000 * 64 * MiB) == 64 * MiB


@pytest.mark.parametrize("size", [10, MULTIPART_SIZE], ids=["put", "multipart"])
def test_update_of_a_missing_key_is_the_same_error_everywhere(any_store: S3Storage, size: int) -> None:
    """AWS and moto answer If-Match on a missing key with 404, SeaweedFS with 412."""
    with pytest.raises(PreconditionError, match="absent"):
        any_store.put("absent", payload(size), mode=UpdateVersion("0" * 32))
    assert not any_store.exists("absent")
    assert any_store.list_multipart_uploads() == []


def test_conditional_multipart_write_stays_atomic(any_store: S3Storage) -> None:
    """moto ignores If-Match on CompleteMultipartUpload: the backend then sends one PUT."""
    first = any_store.put("big", payload(MULTIPART_SIZE, seed=1), mode="create")
    second = any_store.put("big", payload(MULTIPART_SIZE, seed=2), mode=UpdateVersion(first.version or ""))
    with pytest.raises(PreconditionError):
        any_store.put("big", payload(MULTIPART_SIZE, seed=3), mode=UpdateVersion(first.version or ""))
    assert any_store.get("big") == payload(MULTIPART_SIZE, seed=2)
    assert any_store.head("big").version == second.version
    assert any_store.list_multipart_uploads() == []
    assert any_store.list(TEMP_PREFIX) == []  # probe objects cleaned up


# ---------------------------------------------------------------------- options and errors
def test_sse_kms_storage_class_and_requester_pays_reach_the_store(moto: servers.Server, moto_bucket: str) -> None:
    """moto records these (SeaweedFS has no KMS configured and rejects SSE-KMS)."""
    store = fresh_store(moto.endpoint, moto_bucket, sse_kms_key_id="alias/ckpt", storage_class="STANDARD_IA",
                        requester_pays=True)
    store.put("small", b"x")
    store.put("big", payload(MULTIPART_SIZE))
    admin = admin_client(moto.endpoint)
    for key in ("small", "big"):
        head = admin.head_object(Bucket=moto_bucket, Key=store._prefix + key)
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"], head["StorageClass"]) == (
            "aws:kms", "alias/ckpt", "STANDARD_IA")
    assert [m.key for m in store.list()] == ["big", "small"]
    store.delete(["small", "big"])


def test_missing_bucket(server: tuple[servers.Server, str]) -> None:
    store = S3Storage(f"s3://{unique_name('missing')}/p", endpoint_url=server[0].endpoint, config=CONTRACT_CONFIG)
    calls: list[Callable[[], object]] = [lambda: store.get("k"), lambda: store.head("k"), lambda: store.list(),
             lambda: store.delete(["a", "b"])]
    if server[0].name == "moto":  # SeaweedFS creates a missing bucket on an authenticated PUT
        calls += [lambda: store.put("k", b"x"), lambda: store.put("big", payload(MULTIPART_SIZE))]
    for call in calls:
        with pytest.raises(BucketNotFoundError, match=store.bucket):
            call()


def test_urls_and_options() -> None:
    with pytest.raises(InvalidURLError, match="bucket"):
        open_storage("s3://")
    with pytest.raises(InvalidURLError):
        S3Storage("s3:///key")
    with pytest.raises(InvalidURLError, match=r"\.\."):
        S3Storage("s3://bucket/a/../b")
    with pytest.raises(TypeError):
        open_storage("s3://bucket/p", no_such_option=1)
    store = open_storage("s3a://bucket/run/")
    assert isinstance(store, S3Storage)
    assert (store.bucket, store._prefix, store.url) == ("bucket", "run/", "s3a://bucket/run")
    assert store.url_for("ckpt-1.index") == "s3a://bucket/run/ckpt-1.index"


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_endpoint_from_environment(seaweedfs: servers.Server, weed_bucket: str, variable: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, seaweedfs.endpoint)
    store = open_storage(f"s3://{weed_bucket}/{unique_name('env')}")
    assert isinstance(store, S3Storage)
    assert store.client.meta.endpoint_url == seaweedfs.endpoint
    store.put("k", b"via environment")
    assert store.get("k") == b"via environment"


def test_missing_credentials_are_an_authentication_error(seaweedfs: servers.Server, weed_bucket: str) -> None:
    """In a child process with every credential source switched off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=seaweedfs.endpoint)
    script = textwrap.dedent(f"""
        from cloudckpt import open_storage
        from cloudckpt.errors import AuthenticationError
        try:
            open_storage("s3://{weed_bucket}/x").get("k")
        except AuthenticationError as exc:
            print("AuthenticationError:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("AuthenticationError:")
    assert f"s3://{weed_bucket}/x/k" in result.stdout


def bad_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key, config=Config(retries={"total_max_attempts": 1}))


@pytest.mark.parametrize("which", ["unknown key", "wrong secret"])
def test_rejected_credentials_are_an_authentication_error(seaweedfs: servers.Server, weed_bucket: str,
                                                          which: str) -> None:
    """SeaweedFS enforces the credentials it started with (tests/conftest.py sets them)."""
    if which == "unknown key":
        client = bad_client(seaweedfs.endpoint, "no-such-key", "whatever")
    else:
        client = bad_client(seaweedfs.endpoint, os.environ["AWS_ACCESS_KEY_ID"], "wrong-secret")
    store = fresh_store(seaweedfs.endpoint, weed_bucket, client=client)
    with pytest.raises(AuthenticationError, match=r"s3://.*/k"):
        store.get("k")
    with pytest.raises(AuthenticationError):
        store.put("k", b"x")


def test_the_store_checks_the_crc32c_we_send(seaweedfs: servers.Server, weed_bucket: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes damaged on the way (here: a wrong checksum) are refused, never stored."""
    store = fresh_store(seaweedfs.endpoint, weed_bucket)
    monkeypatch.setattr(s3mod, "_crc32c_b64", lambda buffers: "AAAAAA==")
    for data in (b"small", payload(MULTIPART_SIZE)):
        with pytest.raises(StorageError, match="CRC32C"):
            store.put("damaged", data)
    assert not store.exists("damaged")
    assert store.list_multipart_uploads() == []


def test_large_single_put_streams_from_many_buffers(any_store: S3Storage) -> None:
    chunks = [payload(MiB + 1, seed=i) for i in range(3)]  # above SMALL_BODY, below the threshold
    meta = any_store.put("streamed", [memoryview(c) for c in chunks])
    assert meta.version is not None and "-" not in meta.version  # one PUT
    assert any_store.get("streamed") == b"".join(chunks)


def test_buffer_reader_is_a_zero_copy_file() -> None:
    reader = s3mod._BufferReader([memoryview(b"abc"), memoryview(b""), memoryview(b"defg")])
    first = reader.read(2)
    assert isinstance(first, memoryview) and bytes(first) == b"ab"
    assert bytes(reader.read(10)) == b"c"  # short read at a buffer boundary, as a raw file may
    assert reader.tell() == 3
    assert reader.read() == b"defg"
    assert reader.read(5) == b""
    assert reader.seek(0, os.SEEK_END) == 7
    reader.seek(1)
    assert reader.read(-1) == b"bcdefg"


def test_a_forked_child_gets_its_own_client(any_store: S3Storage) -> None:
    parent_client = any_store.client
    any_store.put("from-parent", b"p")
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            any_store.put("from-child", b"c")
            code = 0 if any_store.client is not parent_client and any_store.get("from-parent") == b"p" else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("forked child did not finish in 60 s")
    assert os.waitstatus_to_exitcode(status) == 0
    assert any_store.get("from-child") == b"c"
    assert any_store.client is parent_client


def test_per_key_delete_errors_are_classified() -> None:
    store = S3Storage("s3://bucket/p")
    store._saw_bucket()  # no LIST to explain a 403: there is no server here
    denied = s3mod._delete_error([{"Key": "p/a", "Code": "AccessDenied", "Message": "no"}])
    assert isinstance(store._translate(denied, "s3://bucket/p/a"), PermissionDeniedError)
    busy = s3mod._delete_error([{"Key": "p/a", "Code": "SlowDown", "Message": "slow"}])
    assert store._is_transient(busy)


def test_delete_in_batches(any_store: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3mod, "DELETE_BATCH", 2)
    keys = [f"d/{i}" for i in range(5)]
    for key in keys:
        any_store.put(key, b"x")
    any_store.delete([*keys, "d/never"])
    assert any_store.list("d/") == []


def test_server_time(any_store: S3Storage) -> None:
    stamp = any_store.server_time()
    assert stamp.tzinfo is not None
    assert abs(stamp - datetime.now(timezone.utc)) < timedelta(minutes=5)


# ---------------------------------------------------------------------- faults
@pytest.fixture
def proxy(seaweedfs: servers.Server) -> Iterator[FaultProxy]:
    with FaultProxy(seaweedfs.endpoint) as running:
        yield running


@pytest.fixture
def proxied(proxy: FaultProxy, weed_bucket: str) -> Iterator[S3Storage]:
    store = fresh_store(proxy.endpoint, weed_bucket)
    yield store
    store.close()


def test_throttling_and_resets_are_retried(proxy: FaultProxy, proxied: S3Storage) -> None:
    data = payload(10_000)
    proxy.add(Rule("status", times=2, method="PUT", contains="/obj", status=503, code="SlowDown"))
    proxied.put("obj", data)
    assert len(proxy.requests("/obj", "PUT")) == 3
    proxy.add(Rule("reset", times=1, method="GET", contains="/obj"))
    proxy.add(Rule("status", times=1, method="GET", contains="/obj", status=500, code="InternalError"))
    assert proxied.get("obj") == data
    assert len(proxy.requests("/obj", "GET")) == 3


def test_failing_part_and_ranged_reads_are_retried(proxy: FaultProxy, proxied: S3Storage) -> None:
    data = payload(MULTIPART_SIZE, seed=7)
    rules = [proxy.add(Rule("reset", times=1, method="PUT", contains="partNumber=2")),
             proxy.add(Rule("status", times=1, method="PUT", contains="partNumber=3", status=429, code="SlowDown"))]
    meta = proxied.put("big", data)
    assert meta.version is not None and meta.version.endswith("-3")
    rules.append(proxy.add(Rule("reset", times=2, method="GET", contains="/big")))
    out = bytearray(MULTIPART_SIZE - 10)
    proxied.read_into([ReadRequest("big", 10, memoryview(out))])
    assert bytes(out) == data[10:]
    assert [rule.times for rule in rules] == [0, 0, 0]  # every fault fired
    assert proxied.list_multipart_uploads() == []


@pytest.mark.parametrize("size", [100, MULTIPART_SIZE], ids=["put", "multipart"])
def test_lost_answer_to_a_create_is_not_a_conflict(proxy: FaultProxy, proxied: S3Storage, size: int,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The write lands, the answer is lost, the retry sees 412 / NoSuchUpload: still a success."""
    caplog.set_level(logging.INFO, logger="cloudckpt.storage")
    data = payload(size, seed=11)
    final = ("PUT", "/once") if size < MULTIPART_SIZE else ("POST", "/once?uploadId=")  # PUT, or Complete
    rule = proxy.add(Rule("drop_response", times=1, method=final[0], contains=final[1]))
    meta = proxied.put("once", data, mode="create")
    assert rule.times == 0  # the fault really fired
    assert "an earlier attempt had landed" in caplog.text  # ... and the writer nonce decided
    assert proxied.get("once") == data
    assert proxied.head("once").version == meta.version
    with pytest.raises(AlreadyExistsError):  # and a real second create still fails
        proxied.put("once", b"other", mode="create")


def test_lost_answer_to_a_compare_and_swap_is_not_a_conflict(proxy: FaultProxy, proxied: S3Storage,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cloudckpt.storage")
    first = proxied.put("state", b"1")
    proxy.add(Rule("drop_response", times=1, method="PUT", contains="/state"))
    second = proxied.put("state", b"2", mode=UpdateVersion(first.version or ""))
    assert proxied.get("state") == b"2"
    assert second.version == proxied.head("state").version
    assert len(proxy.requests("/state", "PUT")) == 3  # the plain write, the CAS whose answer was lost, its retry
    assert "an earlier attempt had landed" in caplog.text


def test_a_real_conflict_after_a_retry_is_still_reported(proxy: FaultProxy, proxied: S3Storage) -> None:
    proxied.put("taken", b"someone else's", mode="create")
    proxy.add(Rule("status", times=1, method="PUT", contains="/taken", status=503))
    with pytest.raises(AlreadyExistsError, match="taken"):
        proxied.put("taken", b"mine", mode="create")
    assert proxied.get("taken") == b"someone else's"


def test_read_timeout_is_retried(proxy: FaultProxy, weed_bucket: str) -> None:
    """The server answered, the answer never came: a read timeout, then a retry."""
    client = boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
                          config=Config(retries={"total_max_attempts": 1}, read_timeout=0.5, connect_timeout=2,
                                        s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                        response_checksum_validation="when_required"))
    store = fresh_store(proxy.endpoint, weed_bucket, client=client)
    proxy.add(Rule("hold_response", times=1, method="PUT", contains="/slow", hold_seconds=2))
    store.put("slow", b"eventually")
    assert store.get("slow") == b"eventually"
    assert len(proxy.requests("/slow", "PUT")) == 2


def test_exhausted_retries_surface_as_transient_error(proxy: FaultProxy, proxied: S3Storage) -> None:
    proxy.add(Rule("status", times=100, method="GET", contains="/flaky", status=503, code="SlowDown"))
    with pytest.raises(TransientError, match=r"s3://.*/flaky"):
        proxied.get("flaky")
    # Exactly our attempts: botocore's own retries are off, so waits do not multiply.
    assert len(proxy.requests("/flaky", "GET")) == CONTRACT_CONFIG.retry.max_attempts


def test_store_ignoring_conditions_is_refused(proxy: FaultProxy, weed_bucket: str) -> None:
    """A store that ignores If-None-Match is caught by the probe, before any harm."""
    proxy.add(Rule("ignore_conditions", times=1000, method="PUT"))
    store = fresh_store(proxy.endpoint, weed_bucket)
    store.put("k", b"first")
    with pytest.raises(NotSupportedError, match="ignores conditional writes"):
        store.put("k", b"second", mode="create")
    probes = len(proxy.requests(TEMP_PREFIX))
    with pytest.raises(NotSupportedError):
        store.put("k", b"second", mode=UpdateVersion("x"))
    assert len(proxy.requests(TEMP_PREFIX)) == probes  # probed once per bucket, not per write
    assert store.get("k") == b"first"
    assert store.list(TEMP_PREFIX) == []  # the probe cleaned up after itself
    unchecked = S3Storage(store.url, endpoint_url=proxy.endpoint, config=CONTRACT_CONFIG,
                          check_conditional_writes=False)
    unchecked.put("k", b"second", mode="create")  # believed: the store said 200
    assert len(proxy.requests(TEMP_PREFIX)) == probes


def test_bad_credentials_style_errors_name_the_url() -> None:
    """Error mapping for answers the local servers never give (they accept any key)."""
    from botocore.exceptions import ClientError

    store = S3Storage("s3://bucket/p")
    store._saw_bucket()  # no LIST to explain a 403: there is no server here
    url = "s3://bucket/p/k"
    for code, status, expected in [("InvalidAccessKeyId", 403, "AuthenticationError"),
                                   ("SignatureDoesNotMatch", 403, "AuthenticationError"),
                                   ("ExpiredToken", 400, "AuthenticationError"),
                                   ("ConditionalRequestConflict", 409, "PreconditionError"),
                                   ("SlowDown", 503, "TransientError"),
                                   ("NoSuchUpload", 404, "NotFoundError"),
                                   ("WeirdError", 400, "StorageError")]:
        exc = ClientError({"Error": {"Code": code, "Message": "m"},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
        translated = store._translate(exc, url)
        assert type(translated).__name__ == expected, code
        assert url in str(translated)
    assert isinstance(store._translate(ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"), url),
                      NotFoundError)
    assert isinstance(store._translate(ValueError("x"), url), ValueError)
    assert not isinstance(store._translate(ValueError("x"), url), StorageError)
