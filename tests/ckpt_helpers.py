"""Shared pieces of the checkpoint tests: example objects and a fault-injecting store."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cloudckpt import Trackable, Variable
from cloudckpt.errors import TransientError
from cloudckpt.storage import ObjectMeta, ReadRequest, WriteMode, register_storage, unregister_storage
from cloudckpt.storage.local import LocalStorage


class Dense(Trackable):
    """A tiny layer: a kernel Variable and a bias array."""

    def __init__(self, n_in: int, n_out: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.kernel = Variable(rng.standard_normal((n_in, n_out)).astype(np.float32))
        self.bias = np.zeros(n_out, dtype=np.float32)


class Model(Trackable):
    def __init__(self, seed: int = 0) -> None:
        self.layers = [Dense(3, 4, seed), Dense(4, 2, seed + 1)]
        self.config = {"lr": 0.1, "name": "model", 0: "int-keyed"}


class FaultyStorage(LocalStorage):
    """Local disk with hooks: fail or hold back chosen PUTs, count reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fail_put: Callable[[str], bool] = lambda key: False
        self.gate: threading.Event | None = None
        self.gate_reached = threading.Event()
        self.puts: list[str] = []
        self.read_keys: list[str] = []
        self.read_bytes = 0
        self._lock = threading.Lock()

    def put(self, key: str, data: Any, *, mode: WriteMode = "overwrite",
            metadata: Mapping[str, str] | None = None) -> ObjectMeta:
        with self._lock:
            self.puts.append(key)
        if self.gate is not None and ".data-" in key:
            self.gate_reached.set()
            assert self.gate.wait(timeout=60), "test gate never opened"
        if self.fail_put(key):
            raise TransientError(f"injected failure writing {key}", self.url_for(key))
        return super().put(key, data, mode=mode, metadata=metadata)

    def read_into(self, requests: Sequence[ReadRequest]) -> None:
        with self._lock:
            self.read_keys.extend(r.key for r in requests)
            self.read_bytes += sum(r.out.nbytes for r in requests)
        super().read_into(requests)


def install(storage: LocalStorage) -> None:
    register_storage(storage)


def uninstall(storage: LocalStorage) -> None:
    unregister_storage(storage)
