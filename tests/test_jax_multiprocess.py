"""cloudckpt.jax in a multi-process JAX job: 2 processes x 2 CPU devices on JAX's distributed runtime,
SeaweedFS and fake-gcs-server.

One spawn runs every scenario (starting jax's distributed runtime dominates the cost; body
in tests/jax_worker.py): managed sync and async saves, each process writing only its own
shards and every replicated box once; a failed upload on one process leaving no checkpoint;
a restore onto another mesh reading only the bytes each process's devices hold; a checkpoint
one process wrote restored sharded over two; a resume; an io_device save and restore (bytes
routed through one process over the key-value store); a plain ``Checkpoint`` of sharded arrays
(coordinated by ``default_coordinator()``); a preemption notice on one process saving on both.
This process then restores the job's checkpoint onto its own single device.
"""

from __future__ import annotations

import uuid
from typing import Any

import jax
import jax_worker
import numpy as np
import pytest

import cloudckpt.jax as ccjax
from cloudckpt.testing.processes import spawn_reports

SPAWN_TIMEOUT = 240.0


@pytest.fixture(params=["s3", "gcs"])
def job_root(request: pytest.FixtureRequest) -> str:
    """A fresh directory on SeaweedFS or fake-gcs-server (the spawned processes inherit the endpoints)."""
    if request.param == "s3":
        return str(request.getfixturevalue("s3_root"))
    return f"gs://{request.getfixturevalue('gcs_bucket')}/run-{uuid.uuid4().hex[:8]}"


def test_two_processes_save_restore_fail_and_resume(job_root: str) -> None:
    g = jax_worker.global_values()
    ccjax.save(f"{job_root}/from-one", {"w": jax.numpy.asarray(g["w"] + 5)})  # the job restores it sharded
    reports = spawn_reports(jax_worker.two_processes, 2, job_root, timeout=SPAWN_TIMEOUT)
    for report in reports:
        assert report["devices"] == [2, 4]
        assert report["problems"] == [], report["rank"]
        assert report["latest"].endswith("/managed/ckpt-2")
        assert report["failure"] in ("DistributedSaveError", "SaveError")
        assert report["latest_after_failure"] == report["latest"] and not report["ckpt3_exists"]
        assert report["resumed"].endswith("/managed/ckpt-2") and report["resumed_counter"] == 2
        # each process read exactly the boxes its devices hold on the new mesh (half of w, all of the rest)
        assert report["read"] == report["needed"]
        assert report["plain_checkpoint"] == "saved"  # default_coordinator() is the JAX job's coordinator
        step, path, latest = report["preempted"]  # rank 1's notice: both saved at step 1, the same checkpoint
        assert step == 1 and path == latest and path.endswith("/managed/ckpt-4")
    rank0, rank1 = reports
    # key-value reads per collective: the gather's destination reads the other's key, a broadcast's receiver
    # the source's; any = a gather to rank 0 + a broadcast; only an all-gather reads N - 1 keys on every rank
    assert rank0["collective_gets"] == {"gather": 0, "broadcast": 0, "any": 1, "all_gather": 1}
    assert rank1["collective_gets"] == {"gather": 1, "broadcast": 1, "any": 1, "all_gather": 1}
    assert rank1["collective_results"]["gather"] == [0, 10] and rank0["collective_results"]["gather"] is None
    for report in reports:
        assert report["collective_results"]["broadcast"] == "hello" and report["collective_results"]["any"] is True
        assert report["collective_results"]["all_gather"] == [0, 1]
        assert report["keys_left"] == 0  # every key deleted once every rank was past it
    # each process wrote only its own shards; the replicated boxes were written once, by replica 0's process
    assert rank0["written"] + rank1["written"] == rank0["state_bytes"]
    # rank 1: its half of w, and the two 8-byte single-device values every process holds (the key data,
    # save_counter), which the plan gives the less loaded holder; never a box of the sharded replicated arrays
    assert rank1["written"] == g["w"].nbytes // 2 + 16
    assert rank0["written"] == g["w"].nbytes // 2 + g["replicated"].nbytes + g["cols"].nbytes
    # io_device: rank 0 wrote and read every byte, rank 1 none (its shards went over the key-value store)
    assert rank1["io_written"] == rank1["io_read"] == 0
    assert rank0["io_written"] == rank0["state_bytes"] and rank0["io_read"] > 0

    like: dict[str, Any] = {name: np.zeros_like(value) for name, value in g.items()}
    like = {**like, "w": jax.numpy.zeros(g["w"].shape, g["w"].dtype), "rng": jax.random.key(0), "step": 0}
    restored = ccjax.restore(f"{job_root}/managed/ckpt-2", like)
    assert isinstance(restored["w"], jax.Array)
    for name, value in g.items():
        assert np.asarray(restored[name]).tobytes() == (value + 1).tobytes(), name
    assert restored["step"] == 1


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(s3_root: str) -> None:
    """Rank 1 is SIGKILLed after uploading its shards of ckpt-2: rank 0's save fails, ckpt-1 stays intact."""
    reports = spawn_reports(jax_worker.killed_mid_save, 2, s3_root, timeout=SPAWN_TIMEOUT, may_die={1})
    survivor, killed = reports
    assert killed.get("died") == -9 and "second_save" not in killed
    assert survivor["second_save"] in ("CoordinationError", "DistributedSaveError")
    assert survivor["latest"].endswith("/killed/ckpt-1") and not survivor["ckpt2_index"]
    g = jax_worker.global_values()
    restored = ccjax.restore(f"{s3_root}/killed/ckpt-1", {"w": jax.numpy.zeros(g["w"].shape, g["w"].dtype)})
    assert np.asarray(restored["w"]).tobytes() == g["w"].tobytes()
