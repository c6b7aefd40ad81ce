"""Accelerate's ``save_state`` / ``load_state`` through cloudckpt: ``save_state(accelerator, url)``.

Why functions beside ``Accelerator.save_state`` rather than its hooks: the hooks
(``register_save_state_pre_hook``) only let a caller edit the list of model weights; the
optimizers, schedulers, scaler, RNG states and registered objects are still ``torch.save``'d
(pickled) into a local directory. These functions save the same things - every model,
optimizer and scheduler ``accelerator.prepare`` returned, the gradient scaler, the objects
passed to ``register_for_checkpointing``, the RNG states (Python, numpy, torch, CUDA) and
``accelerator.step`` - as one cloudckpt checkpoint at a URL, and restore them in place.

Not saved: data loader samplers (Accelerate pickles its ``SeedableRandomSampler``; seed your
sampler and re-create it, or skip batches with ``accelerator.skip_first_batches``). The
accelerator's lists of prepared objects are private attributes (``_models``,
``_optimizers``, ``_schedulers``, ``_custom_objects``), the ones ``Accelerator.save_state``
itself reads; a change there is caught by tests/test_hf.py.
"""

from __future__ import annotations

from typing import Any

from cloudckpt.checkpoint import Checkpoint
from cloudckpt.hf.rng import rng_states, set_rng_states
from cloudckpt.options import CheckpointOptions
from cloudckpt.storage import CheckpointPath


def _objects(accelerator: Any) -> dict[str, Any]:
    """What ``Accelerator.save_state`` saves, by name (lists keep ``prepare``'s order)."""
    objects: dict[str, Any] = {"models": list(accelerator._models), "optimizers": list(accelerator._optimizers),
                               "schedulers": list(accelerator._schedulers),
                               "custom": list(accelerator._custom_objects)}
    if getattr(accelerator, "scaler", None) is not None:
        objects["scaler"] = accelerator.scaler
    return objects


def save_state(accelerator: Any, path: CheckpointPath, options: CheckpointOptions | None = None) -> str:
    """Save the accelerator's training state as the checkpoint ``path`` (atomic; replaces one there).

    Call it on every process: the main process writes (others return at once), as with
    ``Accelerator.save_state``. Returns ``path`` as given.
    """
    if not accelerator.is_main_process:
        return str(path)
    extra = {"rng": rng_states(), "step": int(accelerator.step)}
    return Checkpoint(**_objects(accelerator), extra=extra).write(path, options)


def load_state(accelerator: Any, path: CheckpointPath) -> None:
    """Restore what ``save_state`` saved into the accelerator's objects, in place, and its RNG states and step.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``path``.
        CheckpointMismatchError: the prepared objects differ from the saved ones (another model,
            another number of optimizers, ...); nothing is restored.
    """
    extra: dict[str, Any] = {"rng": rng_states(), "step": 0}  # the shapes the stored states fill
    Checkpoint(**_objects(accelerator), extra=extra).read(path).assert_consumed()
    set_rng_states(extra["rng"])
    accelerator.step = int(extra["step"])
