"""TorchTitan's ``CheckpointManager`` on cloudckpt: atomic, CRC32C'd saves to local disk, S3 or GCS.

TorchTitan (0.2.x) checkpoints through ``torchtitan.components.checkpoint.CheckpointManager``,
which calls ``dcp.save`` / ``dcp.async_save`` / ``dcp.load`` with ``checkpoint_id=<folder>/step-N``
only, so torch picks its own ``FileSystemWriter`` (or fsspec's): a directory written file by
file whose ``.metadata`` comes last, no checksum, and - on an object store - no atomic commit.
torch offers no registry to map a ``checkpoint_id`` to another storage writer
(``torch.distributed.checkpoint._storage_utils._storage_setup`` tries its two built-in
classes), so the smallest seam is TorchTitan's own: :class:`CloudCheckpointManager` subclasses
its manager and overrides the methods that touch storage, nothing else -

- ``dcp_save`` / ``dcp_load``: the same DCP calls (sync, async, async with a pinned-memory
  stager in a checkpoint process) with ``cloudckpt.dcp.StorageWriter`` / ``StorageReader`` for
  ``<folder>/step-N`` - a cloudckpt checkpoint ``step-N`` in the directory ``<folder>``
  (``step-N.index`` + data objects), committed by one conditional PUT of its index after every
  rank's data is stored. Hugging Face safetensors saves and loads (``to_hf`` / ``from_hf``)
  stay TorchTitan's;
- ``_find_load_step``: the newest *committed* ``step-N`` (its index exists) - a save killed
  mid-way left no index, so the previous step stays the one a resume loads;
- ``load``: that step through ``dcp_load``, TorchTitan's own ``load`` (initial_load_path,
  Hugging Face assets) when the folder has no committed step;
- ``_purge_stale_checkpoints``: ``keep_latest_k`` by ``cloudckpt.remove_checkpoint``
  (reference-aware; on rank 0, synchronously after the save is started).

Use it by name where the trainer builds its manager::

    import torchtitan.train
    from cloudckpt.dcp.torchtitan import CloudCheckpointManager

    torchtitan.train.CheckpointManager = CloudCheckpointManager   # before Trainer(job_config)

and ``--checkpoint.folder s3://bucket/run/checkpoint`` (or a local folder). See docs/dcp.md.
Importing this module imports torchtitan.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torchtitan.components import checkpoint as titan

from cloudckpt.dcp.reader import StorageReader
from cloudckpt.dcp.writer import StorageWriter
from cloudckpt.errors import NotFoundError
from cloudckpt.format import INDEX_SUFFIX
from cloudckpt.manager.remove import remove_checkpoint
from cloudckpt.storage import storage_for_directory

_STEP = re.compile(r"step-(\d+)")


def committed_steps(folder: str) -> list[int]:
    """The steps with a committed cloudckpt checkpoint ``step-N`` directly in ``folder`` (one LIST), sorted."""
    try:
        keys = [meta.key for meta in storage_for_directory(folder).list()]
    except NotFoundError:
        return []
    steps = {int(m[1]) for key in keys if key.endswith(INDEX_SUFFIX)
             if (m := _STEP.fullmatch(key[:-len(INDEX_SUFFIX)]))}
    return sorted(steps)


class CloudCheckpointManager(titan.CheckpointManager):  # type: ignore[misc]  # torchtitan: no type hints
    """TorchTitan's ``CheckpointManager`` whose DCP saves and loads go through cloudckpt (see the module docs)."""

    @torch.no_grad()
    def dcp_save(self, state_dict: dict[str, Any], checkpoint_id: str, async_mode: titan.AsyncMode,
                 enable_garbage_collection: bool = False, to_hf: bool = False) -> Any:
        if to_hf:
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        writer = StorageWriter(checkpoint_id, overwrite=True)  # TorchTitan re-saves a step it saved (last step)
        if async_mode == titan.AsyncMode.ASYNC:
            result: Any = async_save(state_dict, storage_writer=writer, process_group=self.pg)
        elif async_mode == titan.AsyncMode.ASYNC_WITH_PINNED_MEM:
            result = async_save(state_dict, storage_writer=writer, process_group=self.pg,
                                async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=self.stager)
        else:
            result = dcp_save(state_dict, storage_writer=writer)
        if enable_garbage_collection:
            titan.GarbageCollection.collect("GC collection invoked by checkpointer.")
        return result

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if from_hf:
            super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
            return
        dcp_load(state_dict, storage_reader=StorageReader(checkpoint_id))
        if titan.MODEL in self.states:  # TorchTitan flattens the model's states into the dict: hand them back
            self.states[titan.MODEL].load_state_dict(state_dict)

    def _find_load_step(self, folder: str = "") -> int:
        steps = committed_steps(folder or self.folder)
        return steps[-1] if steps else -1

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        if not self.enable or self.enable_ft_dataloader_checkpoints:
            return bool(super().load(step))
        found = self._find_load_step() if step == -1 else step
        if found == -1:
            return bool(super().load(step))  # nothing committed: TorchTitan's initial load (path, HF assets)
        titan.logger.info(f"Loading the checkpoint from {self._create_checkpoint_id(found)} (cloudckpt).")
        self.dcp_load(self._states_to_load(model_only=found == 0), checkpoint_id=self._create_checkpoint_id(found),
                      from_hf=False, from_quantized=False)
        titan.GarbageCollection.collect("GC collection for checkpoint loading.")
        return True

    def _purge_stale_checkpoints(self) -> None:
        if self.keep_latest_k <= 0 or titan.dist.get_rank() != 0:
            return
        for step in committed_steps(self.folder)[:-self.keep_latest_k]:
            remove_checkpoint(self._create_checkpoint_id(step))
