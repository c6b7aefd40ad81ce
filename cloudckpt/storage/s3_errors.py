"""What S3's answers mean: which are transient, which ask for fewer requests, which are about credentials.

The tables, the classification and the translation into cloudckpt's errors (``translate``,
``refusal`` for a refused conditional write) are here, on botocore's types alone; what needs
the bucket (``S3Storage._diagnose``: why a bare 403/404 happened) is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from cloudckpt.storage.extras import missing_extra

try:
    import botocore.exceptions as bce
    import urllib3.exceptions
except ImportError as _missing:  # boto3 is the install extra cloudckpt[s3]
    raise missing_extra("s3", _missing) from _missing

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

#: Asks the bucket why a bare 403/404 happened: ``(code, message)``, or ``None`` when the
#: original answer stands (``always``: even once the bucket was seen to exist).
Diagnose = Callable[[bool], "tuple[str, str] | None"]

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Answers that ask for fewer requests: back-pressure (throttle.py), retried for minutes.
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
                            "RequestLimitExceeded"})
TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
    "ThrottlingException", "RequestThrottled", "TooManyRequests", "RequestTimeoutException",
})
AUTH_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "MissingSecurityHeader", "InvalidSecurity",
})
CREDENTIAL_ERRORS = (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)
#: Network-level failures worth retrying. botocore's ``SSLError`` is left out on purpose:
#: it is almost always certificate validation, which no retry fixes.
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    bce.EndpointConnectionError,
    bce.ConnectTimeoutError,
    bce.IncompleteReadError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    ConnectionError,
    TimeoutError,
)


def error_info(exc: bce.ClientError) -> tuple[str, int]:
    """(error code, HTTP status) of a ClientError; HEAD errors have only the status."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if not status and code.isdigit():
        status = int(code)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may help: S3's transient codes and statuses, and network failures."""
    if isinstance(exc, StorageError):
        return False
    if isinstance(exc, bce.ClientError):
        code, status = error_info(exc)
        return status in TRANSIENT_STATUS or code in TRANSIENT_CODES
    if isinstance(exc, bce.SSLError):
        return False
    return isinstance(exc, TRANSIENT_EXCEPTIONS)


def is_throttle(exc: BaseException) -> bool:
    """Whether S3 asks for fewer requests (back-pressure, ``throttle.py``)."""
    if not isinstance(exc, bce.ClientError):
        return False
    code, status = error_info(exc)
    # A 503 is S3's "reduce your request rate" (SlowDown, ServiceUnavailable); a HEAD's 503 has
    # no body, so botocore only knows its status ("503") - throttling all the same.
    return code in THROTTLE_CODES or status in (429, 503)


def delete_error(errors: Sequence[Mapping[str, str]]) -> bce.ClientError:
    """Per-key DeleteObjects failures, as a ClientError so classification stays in one place."""
    first = errors[0]
    message = (f"DeleteObjects failed for {len(errors)} key(s); first: {first.get('Key')!r}: "
               f"{first.get('Message') or first.get('Code')}")
    return bce.ClientError({"Error": {"Code": first.get("Code", "InternalError"), "Message": message}},
                           "DeleteObjects")


def refusal(exc: bce.ClientError, url: str, mode: WriteMode) -> PreconditionError | None:
    """The error a refused conditional write means for ``mode``; ``None``: not a refusal."""
    code, status = error_info(exc)
    if mode == "overwrite":
        return None
    if status == 409 and code == "ConditionalRequestConflict":
        return PreconditionError(
            f"{url} was written concurrently by another writer (409 {code}); re-read and retry", url)
    if status == 412 and mode == "create":
        return AlreadyExistsError(f"{url} already exists (mode='create')", url)
    if isinstance(mode, UpdateVersion) and (status == 412 or code == "NoSuchKey"):
        # AWS/moto say 404 for If-Match on a missing key, SeaweedFS 412: same meaning.
        return PreconditionError(
            f"{url} is not at version {mode.version!r} (changed or deleted since it was read)", url)
    return None




def translate(exc: BaseException, url: str, bucket: str, diagnose: Diagnose) -> BaseException:
    """The cloudckpt error for a boto3/botocore one; ``diagnose`` asks the bucket why (error paths only)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, CREDENTIAL_ERRORS):
        return AuthenticationError(
            f"no usable AWS credentials for {url}: {exc} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, or run with an instance/workload role)", url)
    if isinstance(exc, bce.ClientError):
        return translate_client_error(exc, url, bucket, diagnose)
    if is_transient(exc):
        return TransientError(f"{url} kept failing after retries: {exc}", url)
    if isinstance(exc, bce.BotoCoreError):
        return StorageError(f"S3 request for {url} failed: {exc}", url)
    return exc


def translate_client_error(exc: bce.ClientError, url: str, bucket: str, diagnose: Diagnose) -> StorageError:
    """Most specific first; ``url`` names the object, or the prefix for bulk calls.

    A HEAD answer has no body (a bare 403 or 404), and SeaweedFS answers a write to a
    missing bucket with 403 ``AccessDenied``: those are explained by one bucket-level
    request whose answer names the cause - ``NoSuchBucket``, or a credentials error
    such as ``SignatureDoesNotMatch`` (a wrong secret key) - before they are mapped.
    """
    code, status = error_info(exc)
    message = exc.response.get("Error", {}).get("Message") or code
    bare = not code or code.isdigit() or code in ("Forbidden", "NotFound")
    if (bare and status == 403) or code == "AccessDenied" or (bare and status == 404):
        # A 403 is diagnosed every time (credentials may be wrong whatever the bucket);
        # a 404 only until the bucket was seen to exist.
        cause = diagnose(status == 403 or code == "AccessDenied")
        if cause is not None and (cause[0] == "NoSuchBucket" or cause[0] in AUTH_CODES):
            code, message = cause
    if code in ("NoSuchKey", "NoSuchUpload"):
        return NotFoundError(f"{url} not found", url)
    if code == "NoSuchBucket":
        return BucketNotFoundError(f"bucket {bucket!r} of {url} does not exist", url)
    if code in AUTH_CODES:
        return AuthenticationError(f"S3 rejected the credentials for {url}: {code}: {message}", url)
    if code == "InvalidRange" or status == 416:
        return InvalidRangeError(f"byte range not satisfiable for {url} (beyond the object's end)", url)
    if status == 404:
        return NotFoundError(f"{url} not found", url)
    if status == 403 or code == "AccessDenied":
        return PermissionDeniedError(f"access denied to {url}: {code}: {message}", url)
    if status == 412 or code == "ConditionalRequestConflict":
        return PreconditionError(f"conditional request on {url} refused: {code}: {message}", url)
    if is_transient(exc):
        return TransientError(f"{url} kept failing after retries: {code} (HTTP {status}): {message}", url)
    if code in ("BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"):
        return StorageError(f"the store received different bytes for {url} than were sent "
                            f"(CRC32C mismatch) - was the buffer modified during the upload?", url)
    return StorageError(f"S3 error on {url}: {code} (HTTP {status}): {message}", url)
