"""The local tier on 4 hosts (issue 28): real spawned gloo processes, replicas=1, SeaweedFS as the bucket.

One spawn trains (local saves every step, the bucket every 5) until host 3 dies by SIGKILL in
the middle of step 7's local save; the test then wipes host 3's directory (a replacement VM)
and one spawn of the next incarnation resumes five times (tests/tiers_worker.py): a replaced
host, a replica with a flipped byte, the host replaced again with every other copy of its
shard flipped, a host and its replica holder lost, every local tier wiped.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiers_worker

from cloudckpt import load_variable
from cloudckpt.testing.processes import spawn_reports

WORLD = 4
TIMEOUT = 300.0


@pytest.fixture(scope="module")
def runs(s3_root: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bucket = f"{s3_root}/tiers-{uuid.uuid4().hex[:6]}"
    local = tmp_path_factory.mktemp("tiers")
    trained = spawn_reports(tiers_worker.train, WORLD, bucket, str(local), timeout=TIMEOUT,
                            may_die=[tiers_worker.KILLED_RANK])
    killed = Path(local, f"host{tiers_worker.KILLED_RANK}")
    left_by_the_dead = sorted(p.name for p in killed.glob("ckpt-7*"))
    shutil.rmtree(killed)  # the replacement VM's empty local disk
    resumed = spawn_reports(tiers_worker.resume, WORLD, bucket, str(local), timeout=TIMEOUT)
    return {"bucket": bucket, "local": local, "trained": trained, "resumed": resumed,
            "left_by_the_dead": left_by_the_dead}


def test_the_kill_stopped_step_7_on_every_host(runs: dict[str, Any]) -> None:
    trained = runs["trained"]
    assert trained[tiers_worker.KILLED_RANK].get("died") is not None, f"train: host 3 did not die: {trained[3]}"
    for report in trained:
        if report["rank"] != tiers_worker.KILLED_RANK:
            assert report.get("failed_at") == tiers_worker.KILLED_AT, \
                f"train, host {report['rank']}: the local save of step 7 should fail on the dead host: {report}"
            assert report["saved"][-1].endswith("/ckpt-6"), f"train, host {report['rank']}: {report['saved']}"
    assert runs["left_by_the_dead"], "train: host 3 should have written its step-7 shard before dying"


def test_a_replica_that_cannot_be_stored_fails_the_local_save_on_every_host(runs: dict[str, Any]) -> None:
    for report in runs["trained"]:
        if report["rank"] != tiers_worker.KILLED_RANK:
            where = f"train, host {report['rank']}, step {tiers_worker.REPLICA_FAILS_AT}: {report}"
            assert report.get("replica_failure", "").startswith("local save of "), where  # the tier's
            assert "rank 1: OSError: injected: no space left" in report["replica_failure"], where
            assert not any(p.endswith("/ckpt-3") for p in report["saved"]), where


def test_a_bucket_save_made_from_the_local_copies(runs: dict[str, Any]) -> None:
    assert f"{runs['bucket']}/ckpt-4" in runs["trained"][0]["saved"], f"train, host 0: {runs['trained'][0]}"
    np.testing.assert_array_equal(load_variable(f"{runs['bucket']}/ckpt-4", "W"), tiers_worker.expected(4)["W"])
    np.testing.assert_array_equal(load_variable(f"{runs['bucket']}/ckpt-4", "R"), tiers_worker.expected(4)["R"])


def test_a_replaced_host_resumes_from_its_replica_holder_with_no_bucket_reads(runs: dict[str, Any]) -> None:
    local = runs["local"]
    for report in runs["resumed"]:
        seen, where = report["replaced"], f"resume 'replaced', host {report['rank']}"
        assert seen["path"] == f"{local}/host{report['rank']}/ckpt-6", (where, seen)
        assert seen["step"] == 6 and seen["problems"] == [], (where, seen)
        assert seen["bucket_data_gets"] == 0, (where, seen["bucket_counts"])  # 0 bytes of data from the bucket
    # The new host got its shard of step 6 back (and the index) from its replica holder. (Every
    # host also fetched the peers' objects it lacked: R is replicated, each piece written once.)
    new = runs["resumed"][tiers_worker.KILLED_RANK]["replaced"]
    assert "ckpt-6.index" in new["files"] and any(f.startswith("ckpt-6.data-") for f in new["files"]), \
        ("resume 'replaced', host 3", new)
    assert new["received"] > 0, ("resume 'replaced', host 3", new)


def test_a_replica_with_a_flipped_byte_is_never_used(runs: dict[str, Any]) -> None:
    local = runs["local"]
    assert runs["resumed"][(tiers_worker.KILLED_RANK + 1) % WORLD]["flipped"], "resume: host 0 flipped nothing"
    for label, step in (("flipped_replica", 6), ("every_copy_flipped", 5)):  # another copy, else an older step
        for report in runs["resumed"]:
            seen, where = report[label], f"resume {label!r}, host {report['rank']}"
            assert seen["path"] == f"{local}/host{report['rank']}/ckpt-{step}", (where, seen)
            assert seen["step"] == step and seen["problems"] == [], (where, seen)  # bit-exact: never the bad bytes
            assert seen["bucket_data_gets"] == 0, (where, seen["bucket_counts"])


def test_a_host_and_its_replica_lost_then_everything_lost(runs: dict[str, Any]) -> None:
    local, bucket = runs["local"], runs["bucket"]
    lost = [report["host_and_replica_lost"]["path"].rpartition("/")[0] == bucket for report in runs["resumed"]]
    assert len(set(lost)) == 1, ("resume 'host_and_replica_lost': hosts restored from different tiers",
                                 [r["host_and_replica_lost"] for r in runs["resumed"]])
    for report in runs["resumed"]:
        # Host 3 and its replica holder gone: step 5 if it is still complete on the others (copies
        # an earlier resume fetched), otherwise the bucket's step 5 ...
        seen, where = report["host_and_replica_lost"], f"resume 'host_and_replica_lost', host {report['rank']}"
        assert seen["path"] in (f"{local}/host{report['rank']}/ckpt-5", f"{bucket}/ckpt-5"), (where, seen)
        assert seen["step"] == 5 and seen["problems"] == [], (where, seen)
        assert (seen["bucket_data_gets"] > 0) == lost[0], (where, seen)
        # ... and with every local tier wiped, the bucket's.
        seen, where = report["all_wiped"], f"resume 'all_wiped', host {report['rank']}"
        assert seen["path"] == f"{bucket}/ckpt-5", (where, seen)
        assert seen["step"] == 5 and seen["problems"] == [], (where, seen)
        assert seen["bucket_data_gets"] > 0, (where, seen)
