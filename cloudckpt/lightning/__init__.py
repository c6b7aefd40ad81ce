"""Lightning on cloudckpt: ``CloudCheckpointIO``, a ``CheckpointIO`` plugin (docs/integrations.md).

``pip install 'cloudckpt[lightning]'``; imports Lightning, which ``import cloudckpt`` never does.
Importing this module also lets Lightning's file-system calls on ``s3://`` and ``gs://``
directories (``ModelCheckpoint(dirpath="s3://...")``) work without s3fs or gcsfs, through
``cloudckpt.lightning.fs`` - only for protocols no installed fsspec package serves.
"""

from cloudckpt.lightning.checkpoint_io import CloudCheckpointIO
from cloudckpt.lightning.fs import register_fallbacks

register_fallbacks()

__all__ = ["CloudCheckpointIO"]
