"""PyTorch Distributed Checkpoint (DCP) on cloudckpt: ``StorageWriter``, ``StorageReader``, ``DCPCheckpoint``.

::

    import torch.distributed.checkpoint as dcp
    from cloudckpt.dcp import StorageReader, StorageWriter

    dcp.save(state_dict, storage_writer=StorageWriter("s3://bucket/run/step-100"))
    dcp.load(state_dict, storage_reader=StorageReader("s3://bucket/run/step-100"))

What DCP writes through them is an ordinary cloudckpt checkpoint (``cloudckpt ls``,
``inspect``, ``verify``, ``cp``, ``export`` and ``CheckpointReader`` read it): data objects
with write-unique names, CRC32C per chunk and per 1 MiB block, and a JSON index committed
last, once, after every rank's data is stored - DCP's ``Metadata`` encoded in it, never
pickled. ``DCPCheckpoint`` lets ``CheckpointManager`` manage DCP state. See docs/dcp.md.

Importing this package imports torch (``import cloudckpt`` does not import it); without torch
it raises ``MissingDependencyError`` (an ``ImportError``) naming the extra that brings it.
"""

try:
    import torch  # noqa: F401 - only to say which install is missing, before the modules below need it
except ImportError as exc:
    from cloudckpt.errors import MissingDependencyError

    raise MissingDependencyError(
        f"cloudckpt.dcp (PyTorch Distributed Checkpoint) needs torch ({exc}): pip install 'cloudckpt[torch]'"
    ) from exc

from cloudckpt.dcp.checkpoint import DCPCheckpoint
from cloudckpt.dcp.reader import StorageReader
from cloudckpt.dcp.writer import StorageWriter

__all__ = ["DCPCheckpoint", "StorageReader", "StorageWriter"]
