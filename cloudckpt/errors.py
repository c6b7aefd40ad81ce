"""Every error cloudckpt raises, in one tree.

Storage errors also subclass the builtin a caller would naturally catch, so
``except FileNotFoundError`` keeps working when a path turns into an ``s3://`` URL.
Every message names the URL or key at fault.

::

    CloudCkptError(Exception)
    ├── StorageError
    │   ├── NotFoundError(FileNotFoundError)
    │   │   └── BucketNotFoundError
    │   ├── PreconditionError                      conditional write lost
    │   │   └── AlreadyExistsError(FileExistsError)  mode="create" on an existing key
    │   ├── PermissionDeniedError(PermissionError)
    │   │   └── AuthenticationError                credentials missing / rejected
    │   ├── NotSupportedError(NotImplementedError)   backend lacks a capability
    │   ├── TransientError(ConnectionError)        retries exhausted
    │   ├── InvalidKeyError(ValueError)            "..", empty, absolute keys
    │   ├── InvalidRangeError(ValueError)          negative / inverted byte range
    │   └── InvalidURLError(ValueError)            unknown scheme, missing bucket
    ├── ChecksumError                              CRC32C mismatch on read
    ├── CheckpointFormatError(ValueError)          malformed or unknown index
    ├── CheckpointMismatchError(ValueError)        stored shape/dtype/type differs from the object
    ├── CheckpointNotFoundError(NotFoundError)     no index at a checkpoint path
    ├── ConcurrentWriterError                      another writer claimed the directory
    ├── CoordinationError                          a checkpoint collective failed (host died, timed out);
    │                                              defined in cloudckpt.distributed.coordinator
    └── SaveError                                  background / multi-rank save failed
        └── DistributedSaveError                   some ranks failed; lists each rank and its cause
                                                   (cloudckpt.distributed.save)

Why the root derives from ``Exception`` and not ``BaseException``: callers' generic
``except Exception`` handlers must see our failures (a lesson from libraries whose
exception roots escaped them).
"""

from __future__ import annotations


class CloudCkptError(Exception):
    """Root of every error raised by cloudckpt."""


class StorageError(CloudCkptError):
    """A storage operation failed; ``url`` names the object or prefix involved."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class NotFoundError(StorageError, FileNotFoundError):
    """The object (or checkpoint) does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket named in the URL does not exist or is not visible to these credentials."""


class PreconditionError(StorageError):
    """A conditional write found a different version than the writer expected."""


class AlreadyExistsError(PreconditionError, FileExistsError):
    """``put(..., mode="create")`` on a key that already exists."""


class PermissionDeniedError(StorageError, PermissionError):
    """The credentials are valid but not allowed to do this."""


class AuthenticationError(PermissionDeniedError):
    """Credentials are missing, expired or rejected."""


class NotSupportedError(StorageError, NotImplementedError):
    """The backend cannot honour the request (e.g. a conditional write on a plain fsspec store)."""


class TransientError(StorageError, ConnectionError):
    """A retryable failure (throttling, 5xx, reset, timeout) persisted past the retry budget."""


class InvalidKeyError(StorageError, ValueError):
    """A key that is empty, absolute, or escapes the storage prefix with ``..``."""


class InvalidRangeError(StorageError, ValueError):
    """A byte range that is negative, inverted or past the end of the object."""


class InvalidURLError(StorageError, ValueError):
    """A URL with an unknown scheme, no bucket, or otherwise unusable."""


class ChecksumError(CloudCkptError):
    """Bytes read back do not match the CRC32C recorded when they were written."""


class CheckpointFormatError(CloudCkptError, ValueError):
    """A checkpoint index that is malformed, hostile, or of an unknown format version."""


class CheckpointMismatchError(CloudCkptError, ValueError):
    """A checkpoint value does not fit the object it would restore into (shape, dtype, type).

    Raised while validating, before anything is assigned: the objects are left untouched.
    """


class CheckpointNotFoundError(NotFoundError):
    """No committed checkpoint (no ``.index`` object) exists at the given path."""


class ConcurrentWriterError(CloudCkptError):
    """Another writer claimed the checkpoint directory; this writer is fenced off."""


class SaveError(CloudCkptError):
    """A save failed in the background or on one or more ranks; the cause is chained."""
