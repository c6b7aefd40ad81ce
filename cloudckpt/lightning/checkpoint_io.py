"""``CloudCheckpointIO``: Lightning's ``CheckpointIO`` plugin that saves through cloudckpt.

Lightning hands the plugin a checkpoint dict and a path (``s3://bucket/run/epoch=0-step=4.ckpt``,
a ``gs://`` URL, a local path); the storage comes from the path, as everywhere in cloudckpt.
Each Lightning checkpoint is one cloudckpt checkpoint of that name, so it gets what every
checkpoint gets: atomic commit (``<path>.index`` written last), CRC32C on every byte, and
incremental saves - the previous checkpoint this plugin saved (or, after a resume, loaded) in
the same directory is the base whose unchanged pieces are referenced, not uploaded again. ``remove_checkpoint`` is
``cloudckpt.remove_checkpoint``: reference-aware, a piece a later checkpoint still names stays.

Why a marker object at ``<path>`` itself: Lightning's ``ModelCheckpoint`` and
``ckpt_path="last"`` look for *files* (``fs.exists``, ``fs.ls`` of the directory, names ending
in ``.ckpt``). After the commit, the plugin writes a small text object at the path, so
Lightning sees each committed checkpoint as the file it expects (the version counter,
``ckpt_path="last"`` on local disk). The index stays the commit point: a marker whose
index is missing is reported as a missing checkpoint, and the marker is deleted first on removal.

The dict holds more than tensors; ``cloudckpt.lightning.values`` turns sets, ``AttributeDict``
and ``Namespace`` into plain containers (tagged in the index's metadata) and back; ``bytes``
are opaque byte leaves; anything else is refused by the collector with its key path and type.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from cloudckpt.checkpoint import Checkpoint
from cloudckpt.errors import CheckpointFormatError, CheckpointNotFoundError, NotFoundError
from cloudckpt.format.naming import index_key
from cloudckpt.lightning.values import METADATA_KEY, TAGS_VERSION, from_storable, parse_tags, to_storable
from cloudckpt.manager import remove_checkpoint
from cloudckpt.options import CheckpointOptions
from cloudckpt.restoring.checkpoint_reader import CheckpointReader
from cloudckpt.storage import Location, Storage, open_storage, resolve

#: The key the Lightning dict is saved under (``Checkpoint(lightning=...)`` below) (``lightning/state_dict/...``: what
#: ``cloudckpt export --prefix lightning/state_dict/ --strip-prefix`` takes).
ROOT = "lightning"
MARKER = (b"cloudckpt checkpoint: its index is the object beside this one, named as this one plus '.index'.\n"
          b"Load it with cloudckpt.lightning.CloudCheckpointIO or cloudckpt.CheckpointReader.\n")


class CloudCheckpointIO(CheckpointIO):
    """Saves, loads and removes Lightning checkpoints as cloudckpt checkpoints.

    Args:
        options: ``CheckpointOptions`` for every save (thread counts, ...). A save is
            synchronous here; wrap the plugin in Lightning's ``AsyncCheckpointIO`` to save
            in the background (it snapshots the tensors on the training thread first).
        incremental: reference the unchanged pieces of the previous checkpoint this plugin
            saved in the same directory instead of uploading them again.
        storage_options: keyword arguments for ``cloudckpt.open_storage`` of each directory
            (e.g. ``config=TransferConfig(...)``); by default the storage comes from the URL alone.
    """

    def __init__(self, *, options: CheckpointOptions | None = None, incremental: bool = True,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self._options = options
        self._incremental = incremental
        self._storage_options = dict(storage_options or {})
        self._storages: dict[str, Storage] = {}
        self._last_saved: dict[str, str] = {}
        self._lock = threading.Lock()
        #: Held while a save or a removal touches storage: the two never overlap (see ``remove_checkpoint``).
        self._busy = threading.Lock()
        self._pending_removals: list[Location] = []

    def _location(self, path: str | os.PathLike[str]) -> Location:
        location = resolve(os.fspath(path))
        if not self._storage_options:
            return location
        with self._lock:
            storage = self._storages.get(location.storage.url)
            if storage is None:
                storage = self._storages[location.storage.url] = open_storage(location.storage.url,
                                                                              **self._storage_options)
        return Location(storage, location.name)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` as the cloudckpt checkpoint ``path``, then its marker object.

        Raises:
            TypeError: ``storage_options`` was given (per-save options are the constructor's).
            ValueError: a value that cannot be stored without pickle; names its key path and type.
        """
        if storage_options is not None:
            raise TypeError("CloudCheckpointIO.save_checkpoint takes no storage_options; pass options= or "
                            "storage_options= to CloudCheckpointIO(...) instead")
        location = self._location(path)
        tree, tags = to_storable(checkpoint)
        with self._busy:
            with self._lock:
                base = self._last_saved.get(location.storage.url) if self._incremental else None
            try:
                Checkpoint(lightning=tree)._write_managed(
                    location, self._options, metadata={METADATA_KEY: {"version": TAGS_VERSION, "types": tags}},
                    base=base if base != location.name else None)
                location.storage.put(location.name, MARKER)
                with self._lock:
                    self._last_saved[location.storage.url] = location.name
            finally:
                self._remove_pending()
        self._drain()

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint dict saved at ``path``: tensors on the CPU, or moved to ``map_location``
        when it is a device (a ``torch.device`` or a string); ``weights_only`` is moot (nothing
        is unpickled, ever).

        Raises:
            CheckpointNotFoundError: no cloudckpt checkpoint at ``path`` (e.g. a file that
                ``torch.save`` wrote: load that one with Lightning's own ``TorchCheckpointIO``).
            CheckpointFormatError: it holds no Lightning dict, or malformed type tags.
        """
        location = self._location(path)
        try:
            reader = CheckpointReader(location)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"no cloudckpt checkpoint at {location.url} ({index_key(location.name)} does not exist); "
                f"a checkpoint torch.save wrote loads with Lightning's TorchCheckpointIO", location.url) from exc
        if not reader.has_tensor(ROOT):
            raise CheckpointFormatError(f"{location.url} is a cloudckpt checkpoint but no Lightning one "
                                        f"(it has no {ROOT!r} key)")
        tags = parse_tags(reader.metadata, location.url)
        tree = reader.get_tensor(ROOT)
        loaded: dict[str, Any] = from_storable(tree, tags, location.url)
        with self._lock:  # a resumed run's first save builds on the checkpoint it resumed from
            self._last_saved.setdefault(location.storage.url, location.name)
        if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
            import torch
            from lightning_utilities.core.apply_func import apply_to_collection
            loaded = apply_to_collection(loaded, torch.Tensor, lambda t: t.to(map_location))
        return loaded

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the marker, then the checkpoint (reference-aware: pieces that a later,
        incremental checkpoint still names stay). A path with nothing there is no error
        (Lightning removes what its bookkeeping remembers, which may be gone already).

        Why a removal may run later: under ``AsyncCheckpointIO``, ``ModelCheckpoint`` removes the
        checkpoint that fell out of its top k on the training thread while the new save is still
        uploading on the worker thread - and that save may be about to reference pieces of the one
        removed. A removal therefore never overlaps a save: one asked for during a save is queued and
        done by the saving thread right after its commit (so it sees the new index's references);
        otherwise it runs at once. ``teardown`` finishes any still queued.
        """
        location = self._location(path)
        with self._lock:
            self._pending_removals.append(location)
        self._drain()

    def teardown(self) -> None:
        """Finish the removals still queued (waiting for a save in flight)."""
        with self._busy:
            self._remove_pending()

    def _drain(self) -> None:
        """Run the queued removals now, unless a save holds the storage (it will run them)."""
        if self._busy.acquire(blocking=False):
            try:
                self._remove_pending()
            finally:
                self._busy.release()

    def _remove_pending(self) -> None:
        """The queued removals (the caller holds ``_busy``)."""
        while True:
            with self._lock:
                if not self._pending_removals:
                    return
                location = self._pending_removals.pop(0)
                if self._last_saved.get(location.storage.url) == location.name:
                    del self._last_saved[location.storage.url]
            location.storage.delete(location.name)
            with contextlib.suppress(CheckpointNotFoundError, NotFoundError):
                remove_checkpoint(location)
