"""GCS backend against a real fake-gcs-server: the contract, composite uploads, faults, errors.

Faults are injected in the HTTP layer under google-cloud-storage: a requests transport
adapter that forwards every request to the emulator for real, except those a rule
picks, which it fails (synthetic 503/403, a connection reset before sending, a read
timeout *after* the server has processed the request, or one flipped payload byte).
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
from conftest import unique_name
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs
from requests.structures import CaseInsensitiveDict

from cloudckpt.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    ChecksumError,
    InvalidURLError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
)
from cloudckpt.storage import Storage, TransferConfig, UpdateVersion, open_storage
from cloudckpt.storage.base import TEMP_PREFIX, TEMP_SUFFIX
from cloudckpt.storage.checksum import crc32c_combine, crc32c_of
from cloudckpt.storage.gcs import PART_OF_KEY, GCSStorage
from cloudckpt.storage.retry import RetryPolicy
from cloudckpt.storage.urls import parse_bucket_url
from cloudckpt.testing.faults import Faults
from cloudckpt.testing.store_tests import CONTRACT_CONFIG, MULTIPART_SIZE, StorageContract, payload

pytestmark = pytest.mark.gcs

#: Tiny parts, so the compose tree (> 32 parts) runs on a few KiB.
TINY_PARTS = TransferConfig(multipart_threshold=1024, part_size=256, max_concurrency=4,
                            read_chunk_size=4096, retry=CONTRACT_CONFIG.retry)
#: Few, fast retries for the exhausted-retries test.
SHORT_RETRY = TransferConfig(multipart_threshold=CONTRACT_CONFIG.multipart_threshold,
                             part_size=CONTRACT_CONFIG.part_size,
                             retry=RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05,
                                               deadline=5))


# ---------------------------------------------------------------------- fixtures
def emulator_client(session: requests.Session | None = None) -> gcs.Client:
    """A client of the session's fake-gcs-server (STORAGE_EMULATOR_HOST is set by ``fake_gcs``)."""
    return gcs.Client(project="test", credentials=AnonymousCredentials(), _http=session)  # type: ignore[no-untyped-call]


@pytest.fixture
def bucket(fake_gcs: Any) -> str:
    name = unique_name("gcs")
    emulator_client().create_bucket(name)
    return name


def bucket_names(bucket: str) -> list[str]:
    """Every object in the bucket, temporary ones included, as the server lists them."""
    return sorted(str(b.name) for b in emulator_client().list_blobs(bucket))


# ---------------------------------------------------------------------- fault injection
@dataclass
class Rule:
    """Fail the next ``times`` requests that ``match`` with ``kind``."""

    match: Callable[[requests.PreparedRequest], bool]
    kind: str  # "503" | "403" | "reset" | "timeout-after-send" | "corrupt"
    times: int = 1


class FaultAdapter(requests.adapters.HTTPAdapter):
    """Sends requests to the real server, except those a rule fails; records them all.

    With ``faults`` set (``AdapterFaults``), the storage contract's verbs and keys pick
    the requests to fail too, and ``clock_skew`` shifts the ``Date`` of every answer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rules: list[Rule] = []
        self.sent: list[requests.PreparedRequest] = []
        self._lock = threading.Lock()
        self.faults: AdapterFaults | None = None
        self.clock_skew = timedelta(0)

    def add(self, match: Callable[[requests.PreparedRequest], bool], kind: str, times: int = 1) -> Rule:
        rule = Rule(match, kind, times)
        self.rules.append(rule)
        return rule

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        with self._lock:
            self.sent.append(request)
            rule = next((r for r in self.rules if r.times > 0 and r.match(request)), None)
            if rule is not None:
                rule.times -= 1
        if rule is None and self.faults is not None:
            rule = self.faults.rule_for(request)
        if rule is None:
            response = super().send(request, *args, **kwargs)
            if self.clock_skew and "Date" in response.headers:
                response.headers["Date"] = format_datetime(
                    parsedate_to_datetime(response.headers["Date"]) + self.clock_skew, usegmt=True)
            return response
        if rule.kind in ("503", "500", "429", "403"):
            return _synthetic(request, int(rule.kind))
        if rule.kind == "reset":
            raise requests.ConnectionError("injected: connection reset by peer", request=request)
        if rule.kind == "timeout-after-send":
            super().send(request, *args, **kwargs).close()  # the server did the work...
            raise requests.ReadTimeout("injected: read timed out", request=request)  # ...we never heard
        if rule.kind == "corrupt":
            pieces: Any = request.body  # the backend's streamed body: an iterable of buffers
            body = b"".join(bytes(piece) for piece in pieces)
            marker = body.index(b"Content-Type: application/octet-stream\r\n\r\n") + 42
            request.body = body[:marker] + bytes([body[marker] ^ 0xFF]) + body[marker + 1:]
            return super().send(request, *args, **kwargs)
        raise AssertionError(rule.kind)

    def count(self, match: Callable[[requests.PreparedRequest], bool]) -> int:
        with self._lock:
            return sum(1 for r in self.sent if match(r))


def gcs_classify(bucket: str, prefix: str, request: requests.PreparedRequest) -> list[tuple[str, str]]:
    """The contract verb and key (relative to ``prefix``) of one JSON-API request to ``bucket``."""
    url = urlsplit(str(request.url))
    path, query = unquote(url.path), parse_qs(url.query)
    objects = f"/storage/v1/b/{bucket}/o"

    def relative(name: str) -> list[tuple[str, str]]:
        return [] if not name.startswith(prefix) else [("", name[len(prefix):])]

    if path == f"/upload{objects}" and request.method == "POST":
        resource = _resource(request)
        part_of = (resource.get("metadata") or {}).get(PART_OF_KEY)
        return [("part", k) for _, k in relative(part_of)] if part_of else [("put", k)
                                                                             for _, k in relative(resource["name"])]
    if path.startswith(f"/download{objects}/") and request.method == "GET":
        return [("get", k) for _, k in relative(path[len(f"/download{objects}/"):])]
    if path == objects and request.method == "GET":
        return [("list", k) for _, k in relative(query.get("prefix", [""])[0])]
    if path.startswith(f"{objects}/"):
        name = path[len(f"{objects}/"):]
        if name.endswith("/compose") and request.method == "POST":
            name = name[:-len("/compose")]
            return [] if name.startswith(prefix + TEMP_PREFIX) else [("complete", k) for _, k in relative(name)]
        verb = {"GET": "head", "DELETE": "delete"}.get(str(request.method))
        return [(verb, k) for _, k in relative(name)] if verb else []
    return []


class AdapterFaults(Faults):
    """The contract's ``Faults`` through a ``FaultAdapter``: ``fail`` alternates 500 and a reset,
    ``throttle`` is a 429, ``lose_answer`` a read timeout after the server did the work, ``deny`` a 403."""

    def __init__(self, adapter: FaultAdapter, bucket: str, prefix: str) -> None:
        super().__init__()
        self._adapter, self._bucket, self._prefix = adapter, bucket, prefix
        self._failures = 0
        adapter.faults = self

    def rule_for(self, request: requests.PreparedRequest) -> Rule | None:
        kinds = [self.decide(verb, key) for verb, key in gcs_classify(self._bucket, self._prefix, request)]
        kind = next((k for k in kinds if k is not None), None)
        if kind == "fail":
            with self._lock:
                self._failures += 1
                reset = self._failures % 2 == 0
            return Rule(lambda r: True, "reset" if reset else "500")
        if kind == "throttle":
            return Rule(lambda r: True, "429")
        if kind == "lose_answer":
            return Rule(lambda r: True, "timeout-after-send")
        if kind == "deny":
            return Rule(lambda r: True, "403")
        return None

    def skew_clock(self, delta: timedelta) -> bool:
        self._adapter.clock_skew = delta
        return True


class TestFakeGCS(StorageContract):
    has_buckets = True
    throttles = True

    @pytest.fixture
    def store(self, bucket: str) -> Iterator[Storage]:
        storage = GCSStorage(f"gs://{bucket}/root", config=CONTRACT_CONFIG)
        yield storage
        storage.close()

    @pytest.fixture
    def faulty(self, bucket: str) -> Iterator[tuple[Storage, Faults]]:
        adapter = FaultAdapter()
        storage = faulty_store(bucket, adapter)
        yield storage, AdapterFaults(adapter, bucket, parse_bucket_url(storage.url).prefix)
        storage.close()

    @pytest.fixture
    def missing_bucket_store(self, fake_gcs: Any) -> Iterator[Storage]:
        storage = GCSStorage(f"gs://{unique_name('missing')}/p", config=CONTRACT_CONFIG)
        yield storage
        storage.close()

    def _blob(self, store: Storage, key: str) -> gcs.Blob:
        where = parse_bucket_url(store.url)
        return emulator_client().bucket(where.bucket).blob(where.prefix + key)

    def raw_put(self, store: Storage, key: str, data: bytes) -> None:
        self._blob(store, key).upload_from_string(data, retry=None)

    def raw_get(self, store: Storage, key: str) -> bytes | None:
        try:
            data: bytes = self._blob(store, key).download_as_bytes(retry=None)
        except api_exceptions.NotFound:
            return None
        return data

    def raw_keys(self, store: Storage) -> list[str]:
        where = parse_bucket_url(store.url)
        return sorted(str(b.name)[len(where.prefix):]
                      for b in emulator_client().list_blobs(where.bucket, prefix=where.prefix))


def _synthetic(request: requests.PreparedRequest, status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps({"error": {"code": status, "message": "injected"}}).encode()
    response._content_consumed = True
    response.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
    response.request = request
    response.url = str(request.url)
    return response


def _body_head(request: requests.PreparedRequest) -> bytes:
    """The first piece of a streamed upload body: the multipart preamble with the JSON resource."""
    body: Any = request.body
    if body is None or isinstance(body, (bytes, str)):
        return b""
    return bytes(next(iter(body)))


def upload_of(fragment: str) -> Callable[[requests.PreparedRequest], bool]:
    """Simple uploads whose object name contains ``fragment``."""
    return lambda r: "uploadType=multipart" in str(r.url) and fragment.encode() in _body_head(r)


def is_compose(r: requests.PreparedRequest) -> bool:
    return r.method == "POST" and "/compose" in str(r.url)


def is_ranged_get(r: requests.PreparedRequest) -> bool:
    return r.method == "GET" and "alt=media" in str(r.url) and "Range" in r.headers


@pytest.fixture
def faults() -> FaultAdapter:
    return FaultAdapter()


def faulty_store(bucket: str, faults: FaultAdapter, config: TransferConfig = CONTRACT_CONFIG) -> GCSStorage:
    session = requests.Session()
    session.mount("http://", faults)
    return GCSStorage(f"gs://{bucket}/root", client=emulator_client(session), config=config)


# ---------------------------------------------------------------------- composite uploads
def test_large_put_is_a_parallel_composite_upload(bucket: str, faults: FaultAdapter) -> None:
    store = faulty_store(bucket, faults)
    data = payload(MULTIPART_SIZE, seed=11)
    meta = store.put("big", data, metadata={"purpose": "test"})
    assert faults.count(upload_of(TEMP_SUFFIX)) == 3  # 5 + 5 + 3 MiB parts, as temporary objects
    assert faults.count(is_compose) == 1
    final = emulator_client().bucket(bucket).get_blob("root/big")
    assert final is not None
    assert final.component_count in (None, 3)  # GCS reports 3; fake-gcs-server omits the field
    assert meta.version == str(final.generation) == store.head("big").version
    assert store.head("big").metadata["purpose"] == "test"
    assert store.get("big") == data
    assert store.list(TEMP_PREFIX) == []
    assert bucket_names(bucket) == ["root/big"]


@pytest.mark.parametrize(("parts", "composes"), [(32, 1), (33, 2), (70, 4)])
def test_compose_tree_beyond_32_parts(bucket: str, faults: FaultAdapter, parts: int, composes: int) -> None:
    # GCS compose has no minimum source size (S3's 5 MiB minimum part is S3's alone): 256 B parts.
    store = faulty_store(bucket, faults, TINY_PARTS)
    data = payload(parts * 256 - 100, seed=parts)
    store.put("tree", data)
    assert faults.count(upload_of(TEMP_SUFFIX)) == parts
    assert faults.count(is_compose) == composes  # intermediate composites, then the final one
    assert store.get("tree") == data
    assert bucket_names(bucket) == ["root/tree"]


def test_failed_compose_leaves_no_temporaries_and_no_object(bucket: str, faults: FaultAdapter) -> None:
    store = faulty_store(bucket, faults)
    faults.add(is_compose, "403")
    with pytest.raises(PermissionDeniedError):
        store.put("big", payload(MULTIPART_SIZE))
    assert bucket_names(bucket) == []


def test_conditional_writes_above_the_threshold(bucket: str) -> None:
    store = GCSStorage(f"gs://{bucket}", config=CONTRACT_CONFIG)
    first, second = payload(MULTIPART_SIZE, seed=1), payload(MULTIPART_SIZE, seed=2)
    created = store.put("big", first, mode="create")
    with pytest.raises(AlreadyExistsError, match=f"gs://{bucket}/big"):
        store.put("big", second, mode="create")
    updated = store.put("big", second, mode=UpdateVersion(created.version or ""))
    with pytest.raises(PreconditionError):
        store.put("big", first, mode=UpdateVersion(created.version or ""))
    assert store.get("big") == second
    assert store.head("big").version == updated.version
    assert bucket_names(bucket) == ["big"]


def test_compose_precondition_probe_matches_the_server(bucket: str) -> None:
    """The probe's answer is what compose really does here (fake-gcs-server 1.54 ignores it)."""
    client = emulator_client()
    existing = client.bucket(bucket).blob("existing")
    existing.upload_from_string(b"x", retry=None)
    try:
        existing.compose([existing], if_generation_match=0, retry=None)
        enforced = False
    except api_exceptions.PreconditionFailed:
        enforced = True
    store = GCSStorage(f"gs://{bucket}")
    assert store._probe_compose_preconditions() is enforced
    assert bucket_names(bucket) == ["existing"]  # the probe cleaned up after itself


def test_composite_create_sends_the_generation_precondition(bucket: str, faults: FaultAdapter,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a server whose compose enforces preconditions (GCS), create composes with ifGenerationMatch=0."""
    store = faulty_store(bucket, faults)
    monkeypatch.setattr(store, "_multipart_honours", lambda mode, url: True)
    data = payload(MULTIPART_SIZE, seed=4)
    store.put("big", data, mode="create")
    composes = [r for r in faults.sent if is_compose(r)]
    assert len(composes) == 1 and "ifGenerationMatch=0" in str(composes[0].url)
    assert store.get("big") == data


# ---------------------------------------------------------------------- simple uploads
def test_simple_upload_enforces_preconditions_above_the_resumable_threshold(bucket: str) -> None:
    # 9 MiB: above google-cloud-storage's 8 MiB switch to resumable uploads, which
    # fake-gcs-server would accept without checking ifGenerationMatch.
    config = TransferConfig(multipart_threshold=16 * 1024 * 1024, retry=CONTRACT_CONFIG.retry)
    store = GCSStorage(f"gs://{bucket}", config=config)
    first = store.put("nine", payload(9 * 1024 * 1024, seed=1), mode="create")
    with pytest.raises(AlreadyExistsError):
        store.put("nine", payload(9 * 1024 * 1024, seed=2), mode="create")
    with pytest.raises(PreconditionError):
        store.put("nine", b"x", mode=UpdateVersion(str(int(first.version or 0) + 1)))
    assert store.get("nine") == payload(9 * 1024 * 1024, seed=1)


def test_crc32c_is_sent_and_checked(bucket: str, faults: FaultAdapter) -> None:
    store = faulty_store(bucket, faults)
    store.put("ok", b"hello")
    (upload,) = [r for r in faults.sent if upload_of("root/ok")(r)]
    assert _resource(upload)["crc32c"] == "mnG7TA=="  # base64 of the big-endian CRC32C of b"hello"
    faults.add(upload_of("root/bad"), "corrupt")
    with pytest.raises(ChecksumError, match=f"gs://{bucket}/root/bad"):
        store.put("bad", payload(1000))


def test_crc32c_combine_matches_a_full_pass() -> None:
    for left, right in [(0, 5), (5, 0), (1, 1), (1000, 12345), (3 * 1024 * 1024, 5 * 1024 * 1024 + 7)]:
        a, b = payload(left, seed=left), payload(right, seed=right + 1)
        combined = crc32c_combine(crc32c_of([a]), crc32c_of([memoryview(b)]), len(b))
        assert combined == crc32c_of([a + b])


# ---------------------------------------------------------------------- errors and URLs
def test_missing_object_is_not_a_missing_bucket(bucket: str) -> None:
    store = GCSStorage(f"gs://{bucket}")
    with pytest.raises(NotFoundError) as info:
        store.get("nope")
    assert not isinstance(info.value, BucketNotFoundError)


@pytest.mark.parametrize("url", ["gs://", "gs:///prefix", "gcs://", "gs://b/a/../c", "s3://b/k"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(InvalidURLError):
        GCSStorage(url)


def test_open_storage_and_url_forms(fake_gcs: Any) -> None:
    assert isinstance(open_storage("gs://b/p"), GCSStorage)
    assert open_storage("gcs://b/p/").url == "gs://b/p"
    assert GCSStorage("gs://b").url == "gs://b"
    with pytest.raises(InvalidURLError):
        open_storage("gs://")


def test_temporary_objects_are_hidden_from_listing_except_under_temp_prefix(bucket: str) -> None:
    store = GCSStorage(f"gs://{bucket}")
    leftover = f"{TEMP_PREFIX}abc/part-000000{TEMP_SUFFIX}"
    emulator_client().bucket(bucket).blob(leftover).upload_from_string(b"x", retry=None)
    store.put("a", b"1")
    assert [m.key for m in store.list()] == ["a"]
    assert [m.key for m in store.list(TEMP_PREFIX)] == [leftover]


def test_storage_class_is_requested_and_metadata_applied(bucket: str, faults: FaultAdapter) -> None:
    # fake-gcs-server stores every object as STANDARD, so check what was asked for.
    store = faulty_store(bucket, faults, TINY_PARTS)
    store = GCSStorage(store.url, client=store.client, storage_class="NEARLINE", config=TINY_PARTS)
    store.put("small", b"x" * 100, metadata={"a": "1"})
    store.put("big", b"y" * 2000, metadata={"a": "2"})
    resources = [_resource(r) for r in faults.sent if upload_of("root/")(r)]
    assert {r["name"]: r.get("storageClass") for r in resources if TEMP_SUFFIX not in r["name"]} == {
        "root/small": "NEARLINE"}
    assert {r.get("storageClass") for r in resources if TEMP_SUFFIX in r["name"]} == {"STANDARD"}
    (compose,) = [r for r in faults.sent if is_compose(r)]
    destination = json.loads(compose.body or b"")["destination"]  # type: ignore[arg-type]
    assert destination["storageClass"] == "NEARLINE"
    assert destination["metadata"]["a"] == "2"
    assert store.head("small").metadata["a"] == "1"
    assert store.head("big").metadata["a"] == "2"


def _resource(request: requests.PreparedRequest) -> dict[str, Any]:
    """The JSON object resource of a simple upload."""
    resource: dict[str, Any] = json.loads(_body_head(request).split(b"\r\n\r\n", 1)[1].split(b"\r\n", 1)[0])
    return resource


# ---------------------------------------------------------------------- clients
def test_one_client_per_process_rebuilt_after_fork(bucket: str) -> None:
    first, second = GCSStorage(f"gs://{bucket}/a"), GCSStorage(f"gs://{bucket}/b")
    assert first.client is second.client
    first.put("parent", b"p")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_writes, args=(first, first.client, queue))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join(timeout=10)
    assert queue.get(timeout=10) == (True, b"c")
    assert first.get("child") == b"c"


def _child_writes(store: GCSStorage, parent_client: gcs.Client, queue: Any) -> None:
    """Runs in the forked child (arguments are inherited, not pickled)."""
    try:
        rebuilt = store.client is not parent_client
        store.put("child", b"c")
        queue.put((rebuilt, store.get("child")))
    except BaseException as exc:
        queue.put((False, repr(exc).encode()))


def test_retried_update_of_a_deleted_object_is_a_precondition_error(bucket: str, faults: FaultAdapter) -> None:
    """A retried conditional write refused because the object is gone: a clear error, not a raw 404."""
    store = faulty_store(bucket, faults)
    version = store.put("state", b"1").version or ""
    store.delete("state")
    faults.add(upload_of("root/state"), "reset")
    with pytest.raises(PreconditionError, match=f"gs://{bucket}/root/state"):
        store.put("state", b"2", mode=UpdateVersion(version))
    assert not store.exists("state")


def test_a_retried_compose_tree_resumes_where_it_failed(bucket: str, faults: FaultAdapter) -> None:
    store = faulty_store(bucket, faults, TINY_PARTS)
    seen = 0

    def second_compose(request: requests.PreparedRequest) -> bool:
        nonlocal seen
        if not is_compose(request):
            return False
        seen += 1
        return seen == 2

    faults.add(second_compose, "503")
    data = payload(70 * 256, seed=70)
    store.put("tree", data)
    # 3 intermediates + 1 final, plus the failed one again; the first intermediate is not redone
    assert faults.count(is_compose) == 5
    assert store.get("tree") == data
    assert bucket_names(bucket) == ["root/tree"]


@pytest.mark.parametrize("verb", ["read", "restore"])
def test_a_restore_from_a_missing_bucket_says_bucket_not_found(fake_gcs: Any, verb: str) -> None:
    """Like every other call: a mistyped bucket is not "no checkpoint here"."""
    import numpy as np

    import cloudckpt

    url = f"gs://{unique_name('missing')}/run/ckpt-1"
    with pytest.raises(BucketNotFoundError, match="does not exist"):
        getattr(cloudckpt.Checkpoint(w=np.zeros(3)), verb)(url)
