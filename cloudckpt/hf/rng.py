"""The random states a training run resumes with: Python's, numpy's, torch's CPU and CUDA generators.

What ``transformers.Trainer._save_rng_state`` saves (and Accelerate's ``save_state``), as values
cloudckpt stores without pickle: Python's 625-word Mersenne Twister state as one uint32 array
rather than 625 inline ints, numpy's legacy state tuple, torch's state tensors. Shared by
``cloudckpt.hf.trainer`` and ``cloudckpt.hf.accelerate`` (this module imports neither transformers
nor accelerate).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_states() -> dict[str, Any]:
    """The random states the Trainer saves (``Trainer._save_rng_state``), as cloudckpt values
    (Python's 625-word state as one uint32 array rather than 625 inline ints)."""
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {"python": {"version": version, "state": np.array(internal, dtype=np.uint32),
                                         "gauss": gauss},
                              "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what ``rng_states`` gave (as the Trainer's ``_load_rng_state`` does)."""
    python = states["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"]), python["gauss"]))
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(states["cuda"])
