"""Hugging Face on cloudckpt (docs/integrations.md): ``CloudTrainer`` (``transformers.Trainer`` with its
checkpoints in a bucket) and ``save_state`` / ``load_state`` for Accelerate.

Imports transformers / accelerate only from the module that needs them: ``cloudckpt.hf.trainer``
and ``cloudckpt.hf.accelerate``; this package re-exports both lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CloudTrainer", "load_state", "save_state"]


def __getattr__(name: str) -> Any:
    if name == "CloudTrainer":
        from cloudckpt.hf.trainer import CloudTrainer

        return CloudTrainer
    if name in ("save_state", "load_state"):
        from cloudckpt.hf import accelerate

        return getattr(accelerate, name)
    raise AttributeError(f"module 'cloudckpt.hf' has no attribute {name!r}")
