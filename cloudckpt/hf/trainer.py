"""``CloudTrainer``: the Hugging Face ``Trainer`` with its checkpoints in a bucket, through cloudckpt.

Why a subclass, not a ``TrainerCallback``: a callback's ``on_save`` runs *after* the Trainer
wrote ``checkpoint-N/`` to local disk (model, ``torch.save``'d optimizer, scheduler and RNG
state, ``trainer_state.json``), and no callback can load anything when training resumes -
``Trainer.train`` reads ``<resume_from_checkpoint>/trainer_state.json`` and calls its own
loaders. Reading ``transformers`` 5's ``Trainer._save_checkpoint`` and its resume path, the
seams are these methods, which this class overrides (and nothing else):

- ``_save_checkpoint``: every ``save_steps``, one cloudckpt checkpoint ``<checkpoint_dir>/checkpoint-<step>``
  holding the model, optimizer, scheduler, gradient scaler (if any), RNG states (Python,
  numpy, torch CPU, CUDA) and the ``TrainerState`` (as its JSON text), saved by a
  ``CheckpointManager`` - atomic, CRC32C-checked, incremental, retention by ``save_total_limit``;
  nothing is written to local disk and nothing is pickled;
- ``train(resume_from_checkpoint=...)``: ``True`` resumes from the latest checkpoint in
  ``checkpoint_dir``, a URL from that checkpoint. The trainer state is written to a private
  temporary directory as ``trainer_state.json`` (the one file ``Trainer.train`` opens itself), and
  ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_scaler`` and
  ``_load_rng_state`` restore from the cloudckpt checkpoint instead of that directory.

Not covered (documented in docs/integrations.md): DeepSpeed, FSDP and SageMaker model
parallel (the Trainer saves those through their own engines), and multi-process training.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState

from cloudckpt.checkpoint import Checkpoint
from cloudckpt.errors import CheckpointNotFoundError
from cloudckpt.hf.rng import rng_states, set_rng_states
from cloudckpt.manager import CheckpointManager, latest_checkpoint
from cloudckpt.options import CheckpointOptions
from cloudckpt.restoring.checkpoint_reader import CheckpointReader

#: transformers' name of the file it reads itself on resume, and of checkpoint prefixes.
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_NAME = "checkpoint"


class CloudTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints live in ``checkpoint_dir`` (``s3://``, ``gs://``, a path).

    Args:
        *args: ``Trainer``'s.
        checkpoint_dir: where checkpoints go (``TrainingArguments.output_dir`` stays local:
            logs and ``save_model`` output).
        checkpoint_options: ``CheckpointOptions`` for every save (threads, async, ...).
        **kwargs: ``Trainer``'s.
    """

    def __init__(self, *args: Any, checkpoint_dir: str, checkpoint_options: CheckpointOptions | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = checkpoint_dir
        self._checkpoint_options = checkpoint_options
        self._manager: CheckpointManager | None = None
        self._extra: dict[str, Any] = {}
        self._resume: str | None = None

    # ---------------------------------------------------------------- saving
    def _training_checkpoint(self) -> Checkpoint:
        objects: dict[str, Any] = {"model": self.model, "extra": self._extra}
        if self.optimizer is not None:
            objects["optimizer"] = self.optimizer
        if self.lr_scheduler is not None:
            objects["scheduler"] = self.lr_scheduler
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            objects["scaler"] = scaler
        return Checkpoint(**objects)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Save the training state as ``checkpoint-<global step>`` in ``checkpoint_dir`` (see the module docs)."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        stateful: Any = self.state.stateful_callbacks  # a dict by name (annotated as a list upstream)
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):  # as Trainer._save_checkpoint does
                name = type(callback).__name__
                if isinstance(stateful.get(name), list):
                    stateful[name].append(callback.state())
                else:
                    stateful[name] = callback.state()
        self._extra.clear()
        self._extra.update(rng=rng_states(), trainer_state=json.dumps(dataclasses.asdict(self.state)))
        if self._manager is None:
            self._manager = CheckpointManager(self._training_checkpoint(), self.checkpoint_dir,
                                              max_to_keep=self.args.save_total_limit,
                                              checkpoint_name=CHECKPOINT_NAME, options=self._checkpoint_options)
        if self.args.should_save:
            self._manager.save(checkpoint_number=self.state.global_step)

    # ---------------------------------------------------------------- resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint`` is ``True`` (the latest in ``checkpoint_dir``)
        or a checkpoint's URL.

        Raises:
            CheckpointNotFoundError: ``True`` and ``checkpoint_dir`` holds no checkpoint, or no
                checkpoint at the URL given.
        """
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return super().train(None, trial, ignore_keys_for_eval)
        path = latest_checkpoint(self.checkpoint_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if path is None:
            raise CheckpointNotFoundError(f"no checkpoint to resume from in {self.checkpoint_dir}",
                                          self.checkpoint_dir)
        reader = CheckpointReader(path)
        staging = Path(tempfile.mkdtemp(prefix="cloudckpt-resume-"))
        try:
            (staging / TRAINER_STATE_NAME).write_text(reader.get_tensor("extra/trainer_state"))
            self._resume = path
            return super().train(str(staging), trial, ignore_keys_for_eval)
        finally:
            self._resume = None
            shutil.rmtree(staging, ignore_errors=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._resume is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        CheckpointReader(self._resume).restore("model", self.model if model is None else model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._resume is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        reader = CheckpointReader(self._resume)
        reader.restore("optimizer", self.optimizer)
        if self.lr_scheduler is not None and reader.has_tensor("scheduler"):
            reader.restore("scheduler", self.lr_scheduler)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if self._resume is None:
            super()._load_scaler(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        reader = CheckpointReader(self._resume)
        if scaler is not None and reader.has_tensor("scaler"):
            reader.restore("scaler", scaler)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if self._resume is None:
            super()._load_rng_state(checkpoint)
            return
        set_rng_states(CheckpointReader(self._resume).get_tensor("extra/rng"))
