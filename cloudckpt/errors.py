"""Every error cloudckpt raises, in one tree.

Storage errors also subclass the builtin a caller would naturally catch, so
``except FileNotFoundError`` keeps working when a path turns into an ``s3://`` URL.
Every message names the URL or key at fault, and so do the attributes: storage and
checksum errors carry ``url`` (the full URL of the object or prefix) and ``key`` (the
same object relative to its storage root, when known) for programs to read.

::

    CloudCkptError(Exception)
    ├── StorageError
    │   ├── NotFoundError(FileNotFoundError)
    │   │   ├── BucketNotFoundError
    │   │   └── CheckpointNotFoundError            no index at a checkpoint path
    │   ├── PreconditionError                      conditional write lost
    │   │   └── AlreadyExistsError(FileExistsError)  mode="create" on an existing key
    │   ├── PermissionDeniedError(PermissionError)
    │   │   └── AuthenticationError                credentials missing / rejected
    │   ├── NotSupportedError(NotImplementedError)   backend lacks a capability
    │   ├── TransientError(ConnectionError)        retries exhausted
    │   ├── TransferCancelledError                 a write stopped by cancel_transfers (Ctrl-C)
    │   ├── InvalidKeyError(ValueError)            "..", empty, absolute keys
    │   ├── InvalidRangeError(ValueError)          negative / inverted byte range
    │   ├── InvalidURLError(ValueError)            unknown scheme, missing bucket, "s3:/x" typos
    │   └── MissingDependencyError(ImportError)    the URL needs an extra that is not installed
    ├── ChecksumError                              CRC32C mismatch on read
    ├── CheckpointFormatError(ValueError)          malformed or unknown index
    │   ├── CheckpointVersionError                 an index format version this reader does not know
    │   └── CheckpointStateError                   malformed state file (<dir>/checkpoint)
    ├── CheckpointMismatchError(ValueError)        stored shape/dtype/type differs from the object
    ├── ConcurrentWriterError                      another writer claimed the directory
    ├── NoIntactCheckpointError                    every committed checkpoint is damaged (restore_or_initialize)
    ├── CoordinationError                          a checkpoint collective failed (host died, timed out)
    ├── PlanError(ValueError)                      the hosts' shards do not make one checkpoint
    └── SaveError                                  background / multi-rank save failed
        └── DistributedSaveError                   some ranks failed; lists each rank and its cause
            └── AfterCommitError                   committed (complete, valid), but what follows the
                                                   commit failed: bookkeeping, or the committer was lost

Why the root derives from ``Exception`` and not ``BaseException``: callers' generic
``except Exception`` handlers must see our failures (a lesson from libraries whose
exception roots escaped them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class CloudCkptError(Exception):
    """Root of every error raised by cloudckpt."""


class StorageError(CloudCkptError):
    """A storage operation failed.

    Attributes:
        url: the full URL of the object or prefix involved (``None`` if there is none).
        key: that object's key relative to its storage root, when the raiser knows it.
    """

    def __init__(self, message: str, url: str | None = None, *, key: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.key = key


class NotFoundError(StorageError, FileNotFoundError):
    """The object (or checkpoint) does not exist."""


class BucketNotFoundError(NotFoundError):
    """The bucket named in the URL does not exist or is not visible to these credentials."""


class CheckpointNotFoundError(NotFoundError):
    """No committed checkpoint (no ``.index`` object) exists at the given path."""


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


class TransferCancelledError(StorageError):
    """A write was stopped by ``Storage.cancel_transfers`` (the caller was interrupted); it left nothing."""


class InvalidKeyError(StorageError, ValueError):
    """A key that is empty, absolute, or escapes the storage prefix with ``..``."""


class InvalidRangeError(StorageError, ValueError):
    """A byte range that is negative, inverted or past the end of the object."""


class InvalidURLError(StorageError, ValueError):
    """A URL with an unknown scheme, no bucket, or otherwise unusable (``s3:/x`` with one slash)."""


class MissingDependencyError(StorageError, ImportError):
    """The URL needs an SDK that is an install extra not installed here (names the extra)."""


class ChecksumError(CloudCkptError):
    """Bytes read back do not match the CRC32C recorded when they were written.

    Attributes:
        url: the full URL of the object whose bytes are damaged.
        key: the checkpoint key path (``model/dense/kernel``) whose value they hold, when known.
        overwritten: key paths of live objects (restored in place) this restore had already
            written when it failed - the live state is partial; ``()`` when none.
    """

    def __init__(self, message: str, url: str | None = None, *, key: str | None = None,
                 overwritten: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.url = url
        self.key = key
        self.overwritten = overwritten


class CheckpointFormatError(CloudCkptError, ValueError):
    """A checkpoint index that is malformed, hostile, or of an unknown format version."""


class CheckpointVersionError(CheckpointFormatError):
    """The index is of a format version this cloudckpt does not read (written by a newer one).

    Unlike a malformed index it may be perfectly valid, so cleanup treats it as naming
    objects it cannot see: nothing is deleted while one exists.
    """

    def __init__(self, message: str, version: object) -> None:
        super().__init__(message)
        self.version = version


class CheckpointStateError(CheckpointFormatError):
    """The state file (``<directory>/checkpoint``) is not valid TensorFlow ``CheckpointState`` text."""


class CheckpointMismatchError(CloudCkptError, ValueError):
    """A checkpoint value does not fit the object it would restore into (shape, dtype, type).

    Raised while validating, before anything is assigned: the objects are left untouched.
    """


class ConcurrentWriterError(CloudCkptError):
    """Another writer claimed the checkpoint directory; this writer is fenced off."""


class NoIntactCheckpointError(CloudCkptError):
    """Every committed checkpoint of the directory failed to restore because it is damaged.

    Attributes:
        causes: checkpoint name -> why it could not be restored, newest first.
    """

    def __init__(self, message: str, causes: Mapping[str, str]) -> None:
        super().__init__(message)
        self.causes = dict(causes)


class CoordinationError(CloudCkptError):
    """A collective of the checkpoint process group failed (a host died, timed out, or diverged)."""


class PlanError(CloudCkptError, ValueError):
    """The hosts' descriptions do not make one consistent checkpoint (names the key)."""


class SaveError(CloudCkptError):
    """A save failed in the background or on one or more ranks; the cause is chained."""


class DistributedSaveError(SaveError):
    """A multi-host save failed; raised on every rank with the same list of failures.

    Attributes:
        failures: rank -> what went wrong there (as a string; exceptions do not travel).
        committed: ``True`` if the checkpoint's index was nevertheless committed (the
            error is an ``AfterCommitError``): the checkpoint is complete.
    """

    committed: ClassVar[bool] = False

    def __init__(self, message: str, failures: Mapping[int, str]) -> None:
        super().__init__(message)
        self.failures = dict(failures)


class AfterCommitError(DistributedSaveError):
    """The checkpoint was committed - complete and valid - but what follows the commit failed.

    The one "committed, but ..." error of every save path (``Checkpoint``/``DTensorCheckpoint``
    through ``saving.SaveRun``, ``DCPCheckpoint`` through the DCP writer): the bookkeeping
    after the commit (a manager's state file, retention) failed, or the committing host was
    lost right after the commit. Its data is kept; ``committed`` is ``True``. Why a
    ``DistributedSaveError``: code written for many hosts (``except DistributedSaveError``,
    then ``committed``) keeps seeing it. ``cloudckpt.dcp.writer.BookkeepingError``, which the
    DCP writer raised before, is this class under its old name for one release.
    """

    committed: ClassVar[bool] = True
