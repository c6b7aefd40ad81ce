"""S3 backend against two real servers (SeaweedFS and moto), plus injected faults.

No boto3 mocks: every request reaches a real S3 server, through ``tests/faultproxy.py``
where a test needs the network to misbehave.
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import boto3
import botocore.exceptions
import pytest
import servers
from botocore.config import Config
from conftest import unique_name
from faultproxy import Classify, FaultProxy, ProxyFaults, Request, Rule

from cloudckpt import open_storage
from cloudckpt.errors import (
    AuthenticationError,
    InvalidURLError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    PreconditionError,
    StorageError,
)
from cloudckpt.storage import Storage, TransferConfig, UpdateVersion
from cloudckpt.storage import s3 as s3mod
from cloudckpt.storage.base import TEMP_PREFIX, GiB, MiB
from cloudckpt.storage.s3 import S3Storage
from cloudckpt.storage.urls import parse_bucket_url
from cloudckpt.testing.faults import Faults
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
    servers.create_bucket(endpoint, name)
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


def s3_classify(bucket: str, prefix: str) -> Classify:
    """The contract verb and key (relative to ``prefix``) of each path-style S3 request."""
    root = f"/{bucket}"

    def classify(request: Request) -> list[tuple[str, str]]:
        query = request.query
        if request.path.rstrip("/") == root:
            if request.method == "GET" and "list-type" in query:
                listed = query.get("prefix", [""])[0]
                return [("list", listed[len(prefix):])] if listed.startswith(prefix) else []
            if request.method == "POST" and "delete" in query:
                keys = [html.unescape(k.decode()) for k in re.findall(rb"<Key>(.*?)</Key>", request.body)]
                return [("delete", k[len(prefix):]) for k in keys if k.startswith(prefix)]
            return []
        if not request.path.startswith(f"{root}/{prefix}"):
            return []
        key = request.path[len(f"{root}/{prefix}"):]
        first_byte = request.headers.get("range") == "bytes=0-0"  # how S3Storage.head asks
        verb = {"PUT": "part" if "partNumber" in query else "put",
                "POST": "complete" if "uploadId" in query else "begin",
                "GET": "head" if first_byte else "get", "HEAD": "head",
                "DELETE": "abort" if "uploadId" in query else "delete"}.get(request.method)
        return [(verb, key)] if verb else []

    return classify


class S3Contract(StorageContract):
    """The storage contract on a real S3 server; raw access through a plain boto3 client."""

    has_buckets = True
    throttles = True
    server_fixture: ClassVar[str]
    bucket_fixture: ClassVar[str]
    endpoint = ""

    @pytest.fixture
    def s3(self, request: pytest.FixtureRequest) -> tuple[servers.Server, str]:
        server: servers.Server = request.getfixturevalue(self.server_fixture)
        self.endpoint = server.endpoint  # raw access goes around any fault proxy
        return server, request.getfixturevalue(self.bucket_fixture)

    @pytest.fixture
    def store(self, s3: tuple[servers.Server, str]) -> Iterator[Storage]:
        store = fresh_store(s3[0].endpoint, s3[1])
        yield store
        store.close()

    @pytest.fixture
    def faulty(self, s3: tuple[servers.Server, str]) -> Iterator[tuple[Storage, Faults]]:
        with FaultProxy(s3[0].endpoint) as proxy:
            store = fresh_store(proxy.endpoint, s3[1])
            yield store, ProxyFaults(proxy, s3_classify(s3[1], parse_bucket_url(store.url).prefix))
            store.close()

    @pytest.fixture
    def missing_bucket_store(self, s3: tuple[servers.Server, str]) -> Iterator[Storage]:
        store = S3Storage(f"s3://{unique_name('missing')}/p", endpoint_url=s3[0].endpoint, config=CONTRACT_CONFIG)
        yield store
        store.close()

    def _admin(self) -> Any:
        return admin_client(self.endpoint)

    def raw_put(self, store: Storage, key: str, data: bytes) -> None:
        where = parse_bucket_url(store.url)
        self._admin().put_object(Bucket=where.bucket, Key=where.prefix + key, Body=data)

    def raw_get(self, store: Storage, key: str) -> bytes | None:
        where = parse_bucket_url(store.url)
        try:
            body: bytes = self._admin().get_object(Bucket=where.bucket, Key=where.prefix + key)["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise
        return body

    def raw_keys(self, store: Storage) -> list[str]:
        where = parse_bucket_url(store.url)
        admin, bucket, prefix = self._admin(), where.bucket, where.prefix
        keys = [o["Key"][len(prefix):]
                for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", ())]
        uploads = admin.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", ())
        return sorted(keys + [f"{u['Key'][len(prefix):]} (incomplete upload)" for u in uploads])


class TestSeaweedFS(S3Contract):
    """The contract over HTTPS (SeaweedFS's TLS port, its run-time CA as ``AWS_CA_BUNDLE``), as users run
    it: botocore signs and streams differently there (issue 27). moto runs it over plain HTTP, and the
    fault tests reach SeaweedFS through the plain-HTTP fault proxy."""

    server_fixture = "seaweedfs"
    bucket_fixture = "weed_bucket"
    creates_missing_bucket_on_write = True  # on an authenticated PUT

    @pytest.fixture
    def store(self, s3: tuple[servers.Server, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
        store = tls_store(s3[0], s3[1], monkeypatch)
        yield store
        store.close()

    @pytest.fixture
    def missing_bucket_store(self, s3: tuple[servers.Server, str],
                             monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
        store = tls_store(s3[0], unique_name("missing"), monkeypatch)
        yield store
        store.close()


def tls_store(server: servers.Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """A store on ``server``'s HTTPS port, its client verifying the server with the run-time CA."""
    assert server.https_endpoint is not None and server.ca_bundle is not None
    monkeypatch.setenv("AWS_CA_BUNDLE", str(server.ca_bundle))  # read when the (cached) client is built
    store = fresh_store(server.https_endpoint, bucket)
    assert str(store.client.meta.endpoint_url).startswith("https://")
    return store


class TestMoto(S3Contract):
    server_fixture = "moto"
    bucket_fixture = "moto_bucket"


# ---------------------------------------------------------------------- multipart
def test_multipart_really_happened(any_store: S3Storage) -> None:
    meta = any_store.put("big", payload(MULTIPART_SIZE))
    assert meta.version is not None and meta.version.endswith("-3")  # 5 + 5 + 3 MiB
    assert any_store.head("big").version == meta.version


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
    code = "InvalidAccessKeyId" if which == "unknown key" else "SignatureDoesNotMatch"
    for call in (lambda: store.get("k"), lambda: store.head("k"), lambda: store.exists("k"),
                 lambda: store.put("k", b"x"), lambda: store.list()):
        with pytest.raises(AuthenticationError, match=rf"s3://.*{code}"):  # the real cause, even for a bodiless HEAD
            call()


def test_a_wrong_secret_names_its_cause_in_a_save_and_a_restore(seaweedfs: servers.Server, weed_bucket: str) -> None:
    """Through the library, in a child process whose environment holds a wrong secret key."""
    env = {**os.environ, "AWS_ENDPOINT_URL": seaweedfs.endpoint, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    script = textwrap.dedent(f"""
        import numpy as np
        import cloudckpt
        from cloudckpt.errors import AuthenticationError
        for verb in ("write", "read"):
            try:
                getattr(cloudckpt.Checkpoint(w=np.zeros(3)), verb)("s3://{weed_bucket}/wrong/ckpt")
            except AuthenticationError as exc:
                print(verb, type(exc).__name__, exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["write", "AuthenticationError"], ["read", "AuthenticationError"]]
    assert all("SignatureDoesNotMatch" in line for line in lines), lines


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


def test_store_ignoring_conditions_is_refused(proxy: FaultProxy, weed_bucket: str) -> None:
    """A store that ignores If-None-Match is caught by the probe, before any harm."""
    proxy.add(Rule("ignore_conditions", times=1000, method="PUT"))
    store = fresh_store(proxy.endpoint, weed_bucket)
    store.put("k", b"first")
    with pytest.raises(NotSupportedError, match="ignores conditional writes"):
        store.put("k", b"second", mode="create")
    probes = len(proxy.requests(TEMP_PREFIX, "PUT"))
    assert probes == 2  # the scratch object, then its conditional re-creation
    with pytest.raises(NotSupportedError):
        store.put("k", b"second", mode=UpdateVersion("x"))
    assert len(proxy.requests(TEMP_PREFIX, "PUT")) == probes  # probed once per bucket, not per write
    assert store.get("k") == b"first"
    assert store.list(TEMP_PREFIX) == []  # the probe cleaned up after itself
    unchecked = S3Storage(store.url, endpoint_url=proxy.endpoint, config=CONTRACT_CONFIG,
                          check_conditional_writes=False)
    unchecked.put("k", b"second", mode="create")  # believed: the store said 200
    assert len(proxy.requests(TEMP_PREFIX, "PUT")) == probes


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


# ---------------------------------------------------------------------- Ctrl-C
CTRL_C_CHILD = """
import signal
import sys
import numpy as np
import cloudckpt
# Python raises KeyboardInterrupt on SIGINT only if SIGINT was not ignored when it started - and a
# shell starts background jobs with SIGINT ignored (a suite launched with '&' failed here).
signal.signal(signal.SIGINT, signal.default_int_handler)
state = {f"w{i}": np.full(24 * 1024 * 1024, i, dtype=np.float32) for i in range(4)}  # 384 MiB, multipart
print("ready", flush=True)
try:
    cloudckpt.Checkpoint(**state).write(sys.argv[1])
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    raise
print("finished", flush=True)
"""


def test_ctrl_c_during_a_save_stops_its_uploads_and_leaves_nothing(seaweedfs: servers.Server,
                                                                   weed_bucket: str) -> None:
    """A real SIGINT to a process saving to SeaweedFS: it raises KeyboardInterrupt once the parts on
    the wire are done - no further part starts - and leaves no object and no multipart upload.

    The proxy delays each part by a second, so the save is surely mid-flight when the signal lands.
    """
    prefix = f"{unique_name('ctrl-c')}/"
    with FaultProxy(seaweedfs.endpoint) as proxy:
        proxy.add(Rule("delay", times=10_000, method="PUT", contains="partNumber=", hold_seconds=1.0))
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
        child = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, f"s3://{weed_bucket}/{prefix}ckpt"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while len(proxy.requests("partNumber=")) < 2 and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.05)
            started = len(proxy.requests("partNumber="))
            assert started >= 2, "the save never got to its parts"
            child.send_signal(signal.SIGINT)
            out, err = child.communicate(timeout=120)  # bounded: the parts on the wire, then the aborts
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
        total = len(proxy.requests("partNumber="))
    assert "KeyboardInterrupt" in out and "finished" not in out, (out, err[-2000:])
    assert child.returncode == -signal.SIGINT  # died of the interrupt, as Python does after KeyboardInterrupt
    # No part starts after the interrupt: only those already on the wire (one per upload thread) finish.
    assert total <= started + TransferConfig().max_concurrency, (started, total)  # the child uses the defaults
    admin = admin_client(seaweedfs.endpoint)
    assert admin.list_multipart_uploads(Bucket=weed_bucket, Prefix=prefix).get("Uploads", []) == []
    assert admin.list_objects_v2(Bucket=weed_bucket, Prefix=prefix).get("Contents", []) == []


def test_head_of_an_archived_object_still_answers(moto: servers.Server, moto_bucket: str) -> None:
    """head is a one-byte GET; an archived object cannot be read (InvalidObjectState): HEAD answers."""
    store = fresh_store(moto.endpoint, moto_bucket, storage_class="GLACIER")
    store.put("cold", b"archived bytes")
    with pytest.raises(StorageError, match="InvalidObjectState"):
        store.get("cold")  # moto plays the archive: the bytes are not readable
    assert store.head("cold").size == len(b"archived bytes")
    assert store.exists("cold")


def test_a_throttled_save_completes_and_its_stats_say_so(seaweedfs: servers.Server, weed_bucket: str) -> None:
    """503 SlowDown on the commit is back-pressure: the save completes, SaveStats counts it."""
    import numpy as np

    from cloudckpt import Checkpoint
    from cloudckpt.storage import Location

    with FaultProxy(seaweedfs.endpoint) as proxy:
        store = fresh_store(proxy.endpoint, weed_bucket)
        faults = ProxyFaults(proxy, s3_classify(weed_bucket, parse_bucket_url(store.url).prefix))
        faults.throttle("commit", "c.index", times=2)
        ckpt = Checkpoint(v=np.arange(10.0))
        ckpt.write(Location(store, "c"))
        stats = ckpt.last_save_stats
        assert stats is not None and stats.throttled == 2 and stats.retries >= 2
        assert stats.concurrency is not None and 1 <= stats.concurrency <= store.config.max_concurrency
        assert faults.pending() == 0
        target = np.zeros(10)
        Checkpoint(v=target).read(Location(store, "c")).assert_consumed()
        assert target.tolist() == list(np.arange(10.0))
        store.close()


def test_a_bodiless_503_is_throttling_too(seaweedfs: servers.Server, weed_bucket: str) -> None:
    """A HEAD answered 503 carries no XML code: botocore sees only "503", which is S3 saying slow down."""
    from botocore.exceptions import ClientError

    store = fresh_store(seaweedfs.endpoint, weed_bucket)
    head_503 = ClientError({"Error": {"Code": "503", "Message": "Service Unavailable"},
                            "ResponseMetadata": {"HTTPStatusCode": 503}}, "HeadObject")
    not_found = ClientError({"Error": {"Code": "404"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "HeadObject")
    assert store._is_throttle(head_503) and not store._is_throttle(not_found)
    store.close()
