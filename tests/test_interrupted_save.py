"""A save interrupted by Ctrl-C (``KeyboardInterrupt``) during its upload leaves nothing behind.

The interrupt is injected right after a data object's PUT reached the store (the request
landed; the interrupt arrived while the client read the response - what a real Ctrl-C
during a small upload does), on every backend, for one object (uploaded on the caller's
thread) and for several (uploaded on the pool).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from conftest import storage_of

from cloudckpt import Checkpoint, Variable
from cloudckpt.storage import ObjectMeta, TransferConfig, WriteMode


def interrupt_after_data_puts(monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    """Every data object's whole-object PUT lands, then raises ``KeyboardInterrupt``."""
    storage = storage_of(root)
    real = storage._put_whole

    def landed_then_interrupted(full_key: str, buffers: Sequence[memoryview], mode: WriteMode,
                                metadata: Mapping[str, str]) -> ObjectMeta:
        meta = real(full_key, buffers, mode, metadata)
        if ".data-" in full_key:
            raise KeyboardInterrupt
        return meta

    monkeypatch.setattr(storage, "_put_whole", landed_then_interrupted)


@pytest.mark.parametrize("objects", [1, 3])
def test_ctrl_c_during_the_upload_leaves_no_object(root: str, monkeypatch: pytest.MonkeyPatch, objects: int) -> None:
    storage = storage_of(root)
    if objects > 1:  # small objects, one per array, uploaded in parallel
        monkeypatch.setattr(storage, "config", TransferConfig(max_concurrency=objects))
        monkeypatch.setattr("cloudckpt.saving.objects.TARGET_OBJECT_SIZE", 8)
    state: dict[str, Any] = {f"v{k}": Variable(np.float64(k + 0.5)) for k in range(objects)}  # 8 bytes each
    interrupt_after_data_puts(monkeypatch, root)
    with pytest.raises(KeyboardInterrupt):
        Checkpoint(**state).write(f"{root}/ckpt")
    assert [m.key for m in storage.list()] == []


def test_ctrl_c_during_a_dcp_save_leaves_no_object(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DCP writer's ``write_data`` removes what it started too (DCP wraps the interrupt in its
    ``CheckpointException``, which is still raised)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from cloudckpt.coordination import LocalCoordinator
    from cloudckpt.dcp import StorageWriter

    interrupt_after_data_puts(monkeypatch, root)
    with pytest.raises(BaseException, match="KeyboardInterrupt"):
        dcp.save({"w": torch.arange(4, dtype=torch.float64)}, no_dist=True,
                 storage_writer=StorageWriter(f"{root}/dcp", coordinator=LocalCoordinator()))
    assert [m.key for m in storage_of(root).list()] == []
