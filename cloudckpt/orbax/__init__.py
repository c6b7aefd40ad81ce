"""Reading Orbax checkpoints (``StandardCheckpointer``, ``PyTreeCheckpointer``, ``CheckpointManager`` steps).

The migration path for JAX users: an Orbax checkpoint - a directory with
``_CHECKPOINT_METADATA``, its pytree's ``_METADATA`` and its arrays in OCDBT (zarr v2 or v3
through tensorstore) - reads through ``cloudckpt.load_variable``, ``load_checkpoint`` and the
tools (``ls``, ``inspect``, ``cp`` into cloudckpt's format, ``export``), with readable key
paths (``params/dense/kernel``). Read, never written. ``layout`` reads the JSON metadata,
``arrays`` validates each array's zarr metadata, ``kvstore`` points tensorstore at the
store, ``reader`` serves the values. See docs/orbax-import.md.

Importing this package registers the layout with the format layer's sniffer
(``cloudckpt.format.sniff.register_directory_reader``); ``import cloudckpt`` imports it. Only
opening a checkpoint imports tensorstore (the ``cloudckpt[orbax]`` extra) - never jax or orbax.
"""

from __future__ import annotations

from cloudckpt.format.sniff import ForeignCheckpoint, IndexFormat, register_directory_reader
from cloudckpt.orbax.layout import MARKER
from cloudckpt.storage import Storage


def open_foreign(storage: Storage, name: str) -> ForeignCheckpoint:
    """An Orbax checkpoint as the core handles it (imports the reader, and with it tensorstore, now)."""
    from cloudckpt.orbax.reader import open_orbax

    return open_orbax(storage, name)


register_directory_reader(IndexFormat.ORBAX, MARKER, open_foreign)

__all__ = ["MARKER", "open_foreign"]
