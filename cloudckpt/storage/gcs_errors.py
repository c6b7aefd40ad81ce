"""What GCS's answers mean: which failures are transient or throttling, the preconditions
of a write mode, and the translation of SDK and transport errors into cloudckpt's.

Split out of ``gcs`` (issue 23). ``translate`` needs to know whether the bucket itself is
missing (GCS answers 404 for both); the storage passes its cached question in.
"""

from __future__ import annotations

from collections.abc import Callable
from http.client import HTTPException

from cloudckpt.storage.extras import missing_extra

try:
    import requests
    import urllib3
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
except ImportError as _missing:  # google-cloud-storage is the install extra cloudckpt[gcs]
    raise missing_extra("gcs", _missing) from _missing

from cloudckpt.errors import (
    AlreadyExistsError,
    AuthenticationError,
    BucketNotFoundError,
    InvalidRangeError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    StorageError,
    TransientError,
)
from cloudckpt.storage.values import UpdateVersion, WriteMode

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    requests.ConnectionError,  # includes resets and connect timeouts
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,  # a reset or short body while streaming a read
    urllib3.exceptions.TimeoutError,
    HTTPException,
    ConnectionError,
    TimeoutError,
    auth_exceptions.TransportError,  # token endpoint unreachable
)


def generation_match(mode: WriteMode) -> int | None:
    """``ifGenerationMatch`` for a write mode: 0 = must not exist, g = must be at g."""
    if mode == "create":
        return 0
    if isinstance(mode, UpdateVersion):
        try:
            return int(mode.version)
        except ValueError:
            return -1  # matches no generation: a version from another store is stale here
    return None


def precondition_error(mode: WriteMode, url: str) -> PreconditionError:
    if mode == "create":
        return AlreadyExistsError(f"{url} already exists (put mode='create')", url)
    assert isinstance(mode, UpdateVersion)
    return PreconditionError(
        f"{url} is no longer at generation {mode.version} (or is absent): another writer changed it", url)


def is_transient(exc: BaseException) -> bool:
    """5xx, 408, 429 and the transport failures: worth another try."""
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in TRANSIENT_STATUS
    return isinstance(exc, TRANSIENT_TYPES)

def is_throttle(exc: BaseException) -> bool:
    """429 (rate limits: ``rateLimitExceeded``, ``tooManyRequests``) and 503: GCS asks to back off."""
    return isinstance(exc, api_exceptions.GoogleAPICallError) and exc.code in (429, 503)

def translate(exc: BaseException, url: str, bucket_name: str, bucket_missing: Callable[[], bool]) -> BaseException:
    """The cloudckpt error for an SDK or transport error; ``bucket_missing`` is asked only on a 404."""
    if isinstance(exc, (auth_exceptions.DefaultCredentialsError, auth_exceptions.RefreshError)):
        return AuthenticationError(f"GCS credentials for {url} are missing or rejected: {exc}", url)
    if isinstance(exc, TRANSIENT_TYPES):
        return TransientError(f"{url}: {type(exc).__name__}: {exc}", url)
    if not isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc  # our own errors (ChecksumError, ValueError) and programming errors pass
    detail = f"{exc.code} {exc.message}"
    if isinstance(exc, api_exceptions.NotFound):
        if bucket_missing():
            return BucketNotFoundError(f"bucket gs://{bucket_name} does not exist "
                                       f"(or these credentials cannot see it), for {url}", url)
        return NotFoundError(f"{url} not found", url)
    if isinstance(exc, api_exceptions.PreconditionFailed):
        return PreconditionError(f"{url}: precondition failed ({detail})", url)
    if isinstance(exc, api_exceptions.Unauthorized):
        return AuthenticationError(f"GCS rejected the credentials for {url}: {detail}", url)
    if isinstance(exc, api_exceptions.Forbidden):
        return PermissionDeniedError(f"permission denied for {url}: {detail}", url)
    if isinstance(exc, api_exceptions.RequestRangeNotSatisfiable):
        return InvalidRangeError(f"byte range not satisfiable for {url} (starts past the end?)", url)
    if exc.code in TRANSIENT_STATUS:
        return TransientError(f"{url}: {detail}", url)
    return StorageError(f"GCS request for {url} failed: {detail}", url)
