"""What S3's answers mean: which are transient, which ask for fewer requests, which are about credentials.

``S3Storage`` turns these into cloudckpt's errors (``s3.py``: ``_translate``); the tables and
the classification are here, on botocore's types alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cloudckpt.storage.extras import missing_extra

try:
    import botocore.exceptions as bce
    import urllib3.exceptions
except ImportError as _missing:  # boto3 is the install extra cloudckpt[s3]
    raise missing_extra("s3", _missing) from _missing

from cloudckpt.errors import StorageError

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
