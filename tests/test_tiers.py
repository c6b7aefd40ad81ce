"""The local tier on one host (issue 28): local saves with their own retention, the bucket behind,
the newest verified step across both tiers, damage falling back tier by tier, zombies fenced.

The bucket is SeaweedFS (``s3_root``); the local tier a directory under ``tmp_path``. The
multi-process cases (replicas on peers, a replaced host) are in tests/test_tiers_multiprocess.py.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import cloudckpt
from cloudckpt import Checkpoint, CheckpointManager, PreemptionCheckpointHandler, Variable
from cloudckpt.cli import main
from cloudckpt.errors import ConcurrentWriterError
from cloudckpt.manager.tiers import LocalTier, list_local_tier, replica_holders
from cloudckpt.manager.tiers.holdings import Holdings, HostDirectory, Manifest, manifest_key
from cloudckpt.storage.checksum import crc32c_of


def values(step: int) -> np.ndarray:
    return np.arange(64, dtype=np.float32).reshape(8, 8) * step + 0.5


class Job:
    """One incarnation of a training job: a variable, a manager over the bucket and a local tier."""

    def __init__(self, bucket: str, local: Path, *, keep_local: int = 2) -> None:
        self.w = Variable(np.zeros((8, 8), np.float32))
        self.manager = CheckpointManager(Checkpoint(w=self.w), bucket, max_to_keep=3,
                                         local_tier=LocalTier(local, replicas=1, max_to_keep=keep_local))

    def train(self, steps: range, bucket_every: int = 5) -> None:
        for step in steps:
            self.w.assign(values(step))
            self.manager.save(checkpoint_number=step, tier="local")
            if step % bucket_every == 0:
                self.manager.save(checkpoint_number=step)


@pytest.fixture
def bucket(s3_root: str) -> str:
    return f"{s3_root}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def trained(bucket: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Steps 1..7 saved locally (two kept: 6, 7), the bucket at step 5."""
    Job(bucket, tmp_path / "local").train(range(1, 8))
    yield bucket, tmp_path / "local"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def data_files(local: Path, step: int) -> list[Path]:
    return sorted(local.glob(f"ckpt-{step}.data-*"))


def test_local_saves_keep_their_own_retention_and_the_bucket_is_as_today(trained: tuple[str, Path]) -> None:
    bucket, local = trained
    assert sorted(p.name for p in local.glob("ckpt-*.index")) == ["ckpt-6.index", "ckpt-7.index"]
    assert sorted(p.name for p in (local / "tier").iterdir()) == ["ckpt-6.json", "ckpt-7.json", "owner.json"]
    assert cloudckpt.latest_checkpoint(bucket) == f"{bucket}/ckpt-5"
    assert len(data_files(local, 5)) == 0  # the local step 5 was evicted; the bucket's stays


def test_resume_takes_the_newest_verified_step_of_either_tier(trained: tuple[str, Path],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    bucket, local = trained
    job = Job(bucket, local)
    with caplog.at_level(logging.INFO, logger="cloudckpt.manager.tiers"):
        assert job.manager.restore_or_initialize() == f"{local}/ckpt-7"
    np.testing.assert_array_equal(job.w.numpy(), values(7))
    assert "restored" in caplog.text and "from the local tier" in caplog.text
    # The bucket moves ahead (step 10): the bucket's step wins over the local tier's 8.
    job.train(range(8, 11), bucket_every=10)
    for p in local.glob("ckpt-10.*"):
        p.unlink()
    (local / "tier" / "ckpt-10.json").unlink()
    again = Job(bucket, local)
    assert again.manager.restore_or_initialize() == f"{bucket}/ckpt-10"
    np.testing.assert_array_equal(again.w.numpy(), values(10))


def test_damage_falls_back_to_an_older_local_step_then_to_the_bucket(trained: tuple[str, Path],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    bucket, local = trained
    flip_byte(data_files(local, 7)[0])  # a flipped byte in the newest local step
    job = Job(bucket, local)
    with caplog.at_level(logging.WARNING, logger="cloudckpt.manager.tiers"):
        assert job.manager.restore_or_initialize() == f"{local}/ckpt-6"
    np.testing.assert_array_equal(job.w.numpy(), values(6))
    assert "fails its CRC32C check" in caplog.text and "ckpt-7 is incomplete" in caplog.text
    data_files(local, 6)[0].unlink()  # and the older one loses its data object
    job = Job(bucket, local)
    assert job.manager.restore_or_initialize() == f"{bucket}/ckpt-5"
    np.testing.assert_array_equal(job.w.numpy(), values(5))


def test_a_replaced_index_under_a_manifest_is_not_used(trained: tuple[str, Path]) -> None:
    bucket, local = trained
    # What a zombie racing a re-save of step 7 could leave: its own index and (intact) data under
    # the name, replacing ours - the manifest's index CRC32C tells them apart.
    (local / "ckpt-7.index").write_bytes((local / "ckpt-6.index").read_bytes().replace(b"ckpt-6", b"ckpt-7"))
    for f in data_files(local, 6):
        (local / f.name.replace("ckpt-6", "ckpt-7")).write_bytes(f.read_bytes())
    job = Job(bucket, local)
    assert job.manager.restore_or_initialize() == f"{local}/ckpt-6"


def test_a_later_save_removes_what_a_killed_save_left(trained: tuple[str, Path]) -> None:
    bucket, local = trained
    for f in [*data_files(local, 7), local / "ckpt-7.index"]:  # step 5 as a save killed before its manifest
        (local / f.name.replace("ckpt-7", "ckpt-5")).write_bytes(f.read_bytes())
    job = Job(bucket, local)
    job.manager.restore_or_initialize()
    assert data_files(local, 5)  # a resume removes nothing
    job.train(range(8, 9), bucket_every=100)
    assert not list(local.glob("ckpt-5*"))
    assert sorted(p.name for p in local.glob("ckpt-*.index")) == ["ckpt-7.index", "ckpt-8.index"]


def test_everything_local_wiped_restores_the_bucket(trained: tuple[str, Path]) -> None:
    bucket, local = trained
    for p in [*local.glob("ckpt-*"), *(local / "tier").glob("ckpt-*")]:
        p.unlink()
    job = Job(bucket, local)
    assert job.manager.restore_or_initialize() == f"{bucket}/ckpt-5"
    np.testing.assert_array_equal(job.w.numpy(), values(5))


def test_a_zombie_of_the_previous_incarnation_can_neither_save_nor_be_restored(
        trained: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, local = trained
    zombie = Job(bucket, local)  # the incarnation before the preemption, still running somewhere
    zombie.train(range(8, 9), bucket_every=100)
    new = Job(bucket, local)
    assert new.manager.restore_or_initialize() == f"{local}/ckpt-8"  # claims the local tier
    with pytest.raises(ConcurrentWriterError, match="claimed by a newer job"):
        zombie.train(range(9, 10), bucket_every=100)
    assert not list(local.glob("ckpt-9*"))  # stopped before writing a byte
    # A zombie past the first check (it raced the claim) is stopped before its manifest, and
    # removes only what it wrote; the new job's steps stay.
    real = Holdings.check_owner
    calls: list[str] = []

    def first_check_passes(self: Holdings, token: str) -> None:
        calls.append(token)
        if len(calls) > 1:
            real(self, token)

    monkeypatch.setattr(Holdings, "check_owner", first_check_passes)
    with pytest.raises(ConcurrentWriterError):
        zombie.train(range(12, 13), bucket_every=100)
    monkeypatch.undo()
    assert len(calls) == 2  # stopped by the second check, after writing its data
    assert not list(local.glob("ckpt-12*")) and not (local / "tier" / "ckpt-12.json").exists()
    assert sorted(p.name for p in (local / "tier").glob("ckpt-*")) == ["ckpt-7.json", "ckpt-8.json"]
    # A manifest the zombie's token wrote past its fence is never restored.
    holdings = Holdings(new.manager._tier.holdings.storage)  # type: ignore[union-attr]
    old = holdings.manifest("ckpt-8")
    assert old is not None
    (local / "ckpt-13.index").write_bytes((local / "ckpt-8.index").read_bytes().replace(b"ckpt-8", b"ckpt-13"))
    for f in data_files(local, 8):
        (local / f.name.replace("ckpt-8", "ckpt-13")).write_bytes(f.read_bytes())
    index = (local / "ckpt-13.index").read_bytes()
    forged = Manifest("ckpt-13", old.token, crc32c_of([index]), {k.replace("ckpt-8", "ckpt-13"): r
                                                                 for k, r in old.owners.items()})
    holdings.storage.put(manifest_key("ckpt-13"), forged.to_bytes())
    assert Job(bucket, local).manager.restore_or_initialize() == f"{local}/ckpt-8"


def test_arguments_are_checked(bucket: str, tmp_path: Path) -> None:
    manager = CheckpointManager(Checkpoint(w=Variable(np.zeros(2))), bucket, max_to_keep=1)
    with pytest.raises(ValueError, match="tier must be"):
        manager.save(tier="local")
    with pytest.raises(ValueError, match="replicas"):
        LocalTier(tmp_path, replicas=-1)
    with pytest.raises(ValueError, match="max_to_keep"):
        LocalTier(tmp_path, max_to_keep=0)


def test_replicas_go_to_other_failure_domains_first() -> None:
    assert replica_holders(["a", "b", "c", "d"], 1) == [[1], [2], [3], [0]]
    # Two hosts of two processes each: a process's replica is on the other host.
    table = replica_holders(["h1", "h1", "h2", "h2"], 1)
    assert table == [[2], [3], [0], [1]]
    assert replica_holders(["h1", "h1", "h2", "h2"], 2) == [[2, 3], [3, 2], [0, 1], [1, 0]]
    assert replica_holders(["solo", "solo"], 1) == [[1], [0]]  # one machine: peers anyway (warned)
    assert replica_holders(["x"], 1) == [[]]


def test_ls_shows_which_steps_are_in_which_tier(trained: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bucket, local = trained
    for p in (local / "ckpt-6.index", local / "tier" / "ckpt-6.json"):  # step 6 as a killed save leaves it
        p.unlink()
    assert main(["ls", bucket, "--local-tier", str(local), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["status"], s["in_bucket"]) for s in listing["local_tier"]] == [
        ("ckpt-6", "partial", False), ("ckpt-7", "committed", False)]
    Job(bucket, local).manager.save(checkpoint_number=7)  # step 7 to the bucket too
    assert main(["ls", bucket, "--local-tier", str(local)]) == 0
    out = capsys.readouterr().out
    assert f"local tier {local}" in out and "ckpt-7" in out.split("local tier")[0]
    tiers = {line.split()[1]: line.split()[-1] for line in out.split("local tier")[1].splitlines()[2:] if line.strip()}
    assert tiers == {"ckpt-6": "local", "ckpt-7": "local+bucket"}
    steps = list_local_tier(local)
    assert [(s.name, s.status, s.hosts) for s in steps] == [("ckpt-6", "partial", 0), ("ckpt-7", "committed", 1)]


def test_a_preemption_saves_to_the_local_tier_first_then_the_same_step_to_the_bucket(
        bucket: str, tmp_path: Path) -> None:
    job = Job(bucket, tmp_path / "local")
    job.w.assign(values(3))
    exits: list[bool] = []
    handler = PreemptionCheckpointHandler(job.manager, exit_fn=lambda: exits.append(True))
    handler.request_preemption()
    path = handler.save_checkpoint_if_preempted()
    assert exits == [True] and path == f"{bucket}/ckpt-1"
    assert (tmp_path / "local" / "tier" / "ckpt-1.json").exists()
    assert cloudckpt.latest_checkpoint(bucket) == path


def test_a_bucket_save_made_from_the_local_copy_in_the_background(bucket: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    job = Job(bucket, tmp_path / "local")
    job.train(range(1, 4), bucket_every=100)
    job.w.assign(values(99))  # the live state moved on: the bucket gets step 3 as saved locally
    assert job.manager.save(from_local=True) == f"{bucket}/ckpt-3"
    job.manager.sync()  # committed here
    assert cloudckpt.latest_checkpoint(bucket) == f"{bucket}/ckpt-3"
    restored = Variable(np.zeros((8, 8), np.float32))
    Checkpoint(w=restored).restore(f"{bucket}/ckpt-3")
    np.testing.assert_array_equal(restored.numpy(), values(3))
    # An upload failing in the background fails the save at sync, and leaves no checkpoint.
    job.train(range(4, 5), bucket_every=100)
    monkeypatch.setattr(HostDirectory, "view", lambda self, key: (_ for _ in ()).throw(OSError("disk gone")))
    job.manager.save(from_local=True)
    with pytest.raises(cloudckpt.SaveError, match="disk gone"):
        job.manager.sync()
    assert cloudckpt.latest_checkpoint(bucket) == f"{bucket}/ckpt-3"
    with pytest.raises(ValueError, match="tier must be"):
        CheckpointManager(Checkpoint(w=Variable(np.zeros(2))), bucket, max_to_keep=1).save(from_local=True)


def test_the_save_interval_counts_from_a_local_restore(bucket: str, tmp_path: Path) -> None:
    def manager() -> tuple[CheckpointManager, Variable]:
        step = Variable(0)
        made = CheckpointManager(Checkpoint(w=Variable(np.zeros(3)), step=step), bucket, max_to_keep=2,
                                 step_counter=step, checkpoint_interval=10, local_tier=LocalTier(tmp_path / "local"))
        return made, step

    first, step = manager()
    step.assign(5)
    assert first.save(tier="local") is not None
    resumed, step = manager()
    assert resumed.restore_or_initialize() is not None and int(step.numpy()) == 5
    assert resumed.save(tier="local") is None  # step 5 again: within the interval
    step.assign(15)
    assert resumed.save(tier="local") is not None


def test_a_received_object_lands_in_its_file_whole_or_not_at_all(tmp_path: Path) -> None:
    """``HostDirectory.land``: a transfer receives straight into the new file; nothing of an aborted one stays."""
    directory = HostDirectory(tmp_path)
    data = np.arange(3000, dtype=np.uint16).view(np.uint8)
    landing = directory.land("ckpt-1.data-00000-of-00001.ab", data.nbytes)
    assert not (tmp_path / "ckpt-1.data-00000-of-00001.ab").exists()  # invisible until committed
    landing.array[...] = data  # what a transfer does
    landing.commit()
    assert directory.get("ckpt-1.data-00000-of-00001.ab") == data.tobytes()
    sent = directory.map_for_sending("ckpt-1.data-00000-of-00001.ab", data.nbytes)
    assert sent.flags.writeable and bytes(sent) == data.tobytes()  # what transfer() sends without a copy
    aborted = directory.land("ckpt-2.data-00000-of-00001.cd", 10)
    aborted.abort()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ckpt-1.data-00000-of-00001.ab"]
