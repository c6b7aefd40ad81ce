"""Crash consistency (issue 4): a saving process SIGKILLed anywhere loses nothing it reported saved.

A worker (tests/crash_worker.py) saves in a loop to local disk, SeaweedFS or fake-gcs-server and is killed
with a real SIGKILL - at each named phase of a save (``CLOUDCKPT_CRASH_AT``, see
cloudckpt/_testhooks.py) and at seeded random moments from outside. After every kill this
process checks, with fresh readers, what a resuming job would see:

- ``latest_checkpoint`` is not ``None`` once any save returned, and its number is at least
  the last number the worker reported (fsynced after ``save`` returned): no returned save
  is ever lost;
- the restored state is exactly ``state_for(number)`` - bit for bit, dtypes included;
- every checkpoint the state file lists, and every index in the directory at all, has all
  the data objects it names and restores exactly (a checkpoint exists iff its index does);

then a restarted worker resumes from exactly that checkpoint, and its first save removes
what the crash left (``find_leftovers`` with age 0 then finds nothing) without touching a
committed index.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import servers
from conftest import unique_name
from crash_worker import TrainState, differences, state_for

from cloudckpt import Checkpoint
from cloudckpt._testhooks import CRASH_ENV
from cloudckpt.format import INDEX_SUFFIX, decode_index, index_key
from cloudckpt.format.state_file import read_state
from cloudckpt.manager import latest_checkpoint
from cloudckpt.manager.cleanup import Leftover, find_leftovers
from cloudckpt.storage import Storage, join_url, open_storage

WORKER = Path(__file__).with_name("crash_worker.py")
REPO = Path(__file__).resolve().parent.parent
#: Generous bounds for one worker run on a busy 2-core machine; a hang fails, never blocks.
RUN_TIMEOUT = 120.0
READY_TIMEOUT = 60.0
MAX_TO_KEEP = 2  # the worker's default: from the third save on, every save deletes one
RANDOM_SEED = int(os.environ.get("CLOUDCKPT_CRASH_SEED", "20240604"))
RANDOM_KILLS_PER_BACKEND = 4  # x 3 backends = a dozen random moments


@dataclass(frozen=True)
class Target:
    """A fresh checkpoint directory and the environment a worker needs to reach it."""

    backend: str
    directory: str
    env: dict[str, str]
    workdir: Path

    def storage(self) -> Storage:
        """A fresh storage object (no cache shared with the worker or earlier checks)."""
        return open_storage(self.directory)


@pytest.fixture(params=["local", "s3", "gcs"])
def target(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    """Local disk, or a fresh SeaweedFS / fake-gcs-server bucket (so no test sees another's objects)."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    monkeypatch.delenv(CRASH_ENV, raising=False)
    if request.param == "local":
        yield Target("local", str(tmp_path / "ckpts"), env, tmp_path)
        return
    if request.param == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        gcs_server: servers.Server = request.getfixturevalue("fake_gcs")  # sets STORAGE_EMULATOR_HOST here
        bucket = unique_name("crash")
        gcs.Client(project="test", credentials=AnonymousCredentials()).create_bucket(bucket)  # type: ignore[no-untyped-call]
        env["STORAGE_EMULATOR_HOST"] = gcs_server.endpoint  # and for the worker
        yield Target("gcs", f"gs://{bucket}/run", env, tmp_path)
        return
    server: servers.Server = request.getfixturevalue("seaweedfs")
    bucket = unique_name("crash")
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)  # for this process's checks
    env["AWS_ENDPOINT_URL"] = server.endpoint  # and the worker's (dummy credentials come from conftest)
    yield Target("s3", f"s3://{bucket}/run", env, tmp_path)


# ---------------------------------------------------------------------------- worker runs
def worker_argv(target: Target, report: Path, steps: int, big: bool, async_saves: bool = False) -> list[str]:
    argv = [sys.executable, str(WORKER), target.directory, str(report), "--steps", str(steps),
            "--max-to-keep", str(MAX_TO_KEEP)]
    return argv + (["--big"] if big else []) + (["--async-saves"] if async_saves else [])


def run_worker(target: Target, report: Path, *, steps: int, crash_at: str | None = None,
               big: bool = False, async_saves: bool = False) -> subprocess.CompletedProcess[str]:
    """One worker run to its end (exit 0) or to its crash point (SIGKILL), bounded in time."""
    env = dict(target.env)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run(worker_argv(target, report, steps, big, async_saves), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def kill_after(target: Target, report: Path, delay: float, *, big: bool) -> tuple[int, str]:
    """Start a worker saving (practically) forever, SIGKILL it ``delay`` s after it resumed.

    Why wait for the resume note: the delay then measures time spent in the save loop, not
    in interpreter start-up, so the kill lands mid-loop on any machine speed.
    """
    out_path = target.workdir / "worker.out"
    before = resumed_lines(report)
    with open(out_path, "w") as out:
        process = subprocess.Popen(worker_argv(target, report, 100_000, big), env=target.env, cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while len(resumed_lines(report)) == len(before) and process.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"worker did not get past its restore within {READY_TIMEOUT} s")
                time.sleep(0.01)
            if process.poll() is None:
                time.sleep(delay)
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGKILL)
            code = process.wait(timeout=RUN_TIMEOUT)
        finally:
            if process.poll() is None:  # only if something above raised: never leave it running
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=RUN_TIMEOUT)
    return code, out_path.read_text()


# ---------------------------------------------------------------------------- the report
def reported_saves(report: Path) -> list[int]:
    """Numbers of the saves that returned, in order (lines written after ``save`` returned)."""
    if not report.exists():
        return []
    return [int(line.split()[0]) for line in report.read_text().splitlines() if line and not line.startswith("#")]


def resumed_lines(report: Path) -> list[str]:
    """``# resumed <path or -> at step N pid P`` notes, one per worker run that got going."""
    if not report.exists():
        return []
    return [line for line in report.read_text().splitlines() if line.startswith("# resumed ")]


def number_of(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


# ---------------------------------------------------------------------------- the checks
def restored(path: str, big: bool) -> dict[str, object]:
    """What a fresh process restores from ``path`` (CRC32C verified on every array)."""
    state = TrainState(big)
    Checkpoint(state=state).restore(path)
    return state.as_dict()


def assert_intact(storage: Storage, directory: str, name: str, big: bool, why: str) -> None:
    """Checkpoint ``name`` has its index, every data object it names, and exactly its state."""
    assert storage.exists(index_key(name)), f"{why}: {name} has no index"
    index = decode_index(storage.get(index_key(name)), name, storage.url_for(name))
    for obj in index.objects:
        assert storage.exists(obj.name), f"{why}: data object {obj.name} of committed {name} is gone"
        assert storage.head(obj.name).size == obj.size, f"{why}: data object {obj.name} has the wrong size"
    problems = differences(restored(join_url(directory, name), big), state_for(number_of(name), big))
    assert not problems, f"{why}: {name} does not hold state_for({number_of(name)}): {problems}"


def committed_indexes(storage: Storage) -> set[str]:
    """Names of every checkpoint with an index directly in the directory."""
    return {m.key[: -len(INDEX_SUFFIX)] for m in storage.list() if "/" not in m.key and m.key.endswith(INDEX_SUFFIX)}


def check_consistent(target: Target, report: Path, big: bool, why: str) -> str | None:
    """Everything a resuming job relies on; returns the latest checkpoint's path."""
    saves = reported_saves(report)
    assert saves == sorted(set(saves)), f"{why}: reported save numbers are not strictly increasing: {saves}"
    storage = target.storage()
    latest = latest_checkpoint(target.directory)
    if saves:
        assert latest is not None, f"{why}: saves {saves} returned, but latest_checkpoint is None"
        assert number_of(latest) >= saves[-1], f"{why}: returned save ckpt-{saves[-1]} lost; latest is {latest}"
    if latest is not None:
        problems = differences(restored(latest, big), state_for(number_of(latest), big))
        assert not problems, f"{why}: latest {latest} does not hold what was saved under it: {problems}"
    found = read_state(storage)
    listed = found[0].all_model_checkpoint_paths if found else []
    for name in listed:
        assert_intact(storage, target.directory, name, big, f"{why} (listed in the state file)")
    for name in sorted(committed_indexes(storage) - set(listed)):
        assert_intact(storage, target.directory, name, big, f"{why} (committed, not listed)")
    return latest


def leftovers(target: Target) -> list[Leftover]:
    return find_leftovers(target.storage(), min_age=timedelta(0))


def describe(items: list[Leftover]) -> list[str]:
    return sorted(f"{item.kind}:{item.key}" for item in items)


def restart_and_check(target: Target, report: Path, latest: str | None, big: bool, why: str,
                      async_saves: bool = False) -> None:
    """A clean worker resumes from exactly ``latest``; its first save leaves no leftovers.

    Checkpoints the killed save had evicted (the state file lists them as ``deleting``) must
    be gone after the restart; every other committed one must survive it.
    """
    pending = set(_deleting(target.storage()))
    orphans = committed_indexes(target.storage()) - set(_listed(target.storage())) - pending
    result = run_worker(target, report, steps=2, big=big, async_saves=async_saves)
    assert result.returncode == 0, f"{why}: restart failed ({result.returncode}):\n{result.stderr[-3000:]}"
    assert resumed_lines(report)[-1].startswith(f"# resumed {latest or '-'} "), \
        f"{why}: restart did not resume from {latest}: {resumed_lines(report)[-1]}"
    start = number_of(latest) if latest else 0
    assert reported_saves(report)[-2:] == [start + 1, start + 2], f"{why}: restart did not continue from {latest}"
    after = check_consistent(target, report, big, f"{why}, after the restart")
    assert after == join_url(target.directory, f"ckpt-{start + 2}")
    left = leftovers(target)
    assert not left, f"{why}: the restart's first save left the crash's leftovers: {describe(left)}"
    gone = orphans - committed_indexes(target.storage())
    assert not gone, f"{why}: committed (unlisted) checkpoints {sorted(gone)} were removed by the restart"
    unfinished = pending & committed_indexes(target.storage())
    assert not unfinished, f"{why}: the restart did not finish deleting the evicted {sorted(unfinished)}"


def _deleting(storage: Storage) -> list[str]:
    found = read_state(storage)
    return found[0].deleting if found else []


def _listed(storage: Storage) -> list[str]:
    found = read_state(storage)
    return found[0].all_model_checkpoint_paths if found else []


# ---------------------------------------------------------------------------- named crash points
@dataclass(frozen=True)
class Case:
    """A crash point, and what killing a fresh directory's worker there must leave.

    ``returned``: saves that returned before the kill. ``latest``: the number a reader then
    finds (0: none). ``orphan_data``: the checkpoints whose data objects no index names (with
    incremental saves, objects of an earlier checkpoint that only the deleted one still named).
    """

    crash_at: str
    returned: int
    latest: int
    orphan_data: tuple[int, ...] = ()


# With max_to_keep=2 the first deletion (of ckpt-1) happens in save 3, the second in save 4.
# Every save is incremental (crash_worker.state_for): ckpt-2 references ckpt-1's objects holding
# the frozen array and the embedding of steps 1-2; ckpt-3 and later only the frozen one.
CASES = [
    Case("after_data_upload", returned=0, latest=0, orphan_data=(1,)),   # nothing committed at all
    Case("after_data_upload:3", returned=2, latest=2, orphan_data=(3,)),
    Case("after_index_write", returned=0, latest=1),                     # committed, not yet listed: found
    Case("after_index_write:3", returned=2, latest=2),
    Case("after_state_write", returned=0, latest=1),                     # listed, save never returned
    Case("after_state_write:3", returned=2, latest=3),                   # listed; ckpt-1 not yet deleted
    Case("after_delete_index", returned=2, latest=3, orphan_data=(1,)),  # ckpt-1's data outlives its index
    # ckpt-2's index gone: its objects, and ckpt-1's embedding object that only ckpt-2 named
    Case("after_delete_index:2", returned=3, latest=4, orphan_data=(1, 2)),
    Case("after_delete_data", returned=2, latest=3),
    Case("after_delete_data:2", returned=3, latest=4),
]


@pytest.mark.parametrize("async_saves", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("case", CASES, ids=[c.crash_at for c in CASES])
def test_sigkill_at_crash_point_loses_nothing(target: Target, case: Case, async_saves: bool) -> None:
    """Async saves hit the same points on their background worker; a save counts as returned once
    the next save (which waits for it) returned, so the expectations are the same."""
    why = f"{target.backend}, {'async' if async_saves else 'sync'} saves, killed at {case.crash_at}"
    report = target.workdir / "report.txt"
    result = run_worker(target, report, steps=6, crash_at=case.crash_at, async_saves=async_saves)
    assert result.returncode == -signal.SIGKILL, \
        f"{why}: worker was not killed by its crash point (exit {result.returncode}):\n{result.stderr[-3000:]}"
    assert reported_saves(report) == list(range(1, case.returned + 1)), f"{why}: the crash landed elsewhere"

    latest = check_consistent(target, report, False, why)
    assert (number_of(latest) if latest else 0) == case.latest, f"{why}: latest is {latest}"
    expected = {f"unreferenced-data:ckpt-{n}" for n in case.orphan_data}
    found = {item.split(".data-")[0] for item in describe(leftovers(target))}
    assert found == expected, f"{why}: leftovers before the restart: {describe(leftovers(target))}"

    restart_and_check(target, report, latest, False, why, async_saves)


# ---------------------------------------------------------------------------- random moments
def test_sigkill_at_random_moments_loses_nothing(target: Target) -> None:
    """A job preempted again and again, each time at a seeded random moment of its save loop.

    Every run resumes from the previous kill's latest checkpoint and cleans up after it;
    with ``--big`` each save carries a two-part multipart upload, so kills also land
    between parts and leave incomplete uploads and temporary files behind.
    """
    rng = random.Random(f"{RANDOM_SEED}-{target.backend}")
    delays = [round(rng.uniform(0.05, 1.5), 3) for _ in range(RANDOM_KILLS_PER_BACKEND)]
    report = target.workdir / "report.txt"
    latest: str | None = None
    for k, delay in enumerate(delays):
        why = (f"{target.backend}, random kill {k + 1}/{len(delays)} after {delay} s "
               f"(seed {RANDOM_SEED}, delays {delays}; rerun with CLOUDCKPT_CRASH_SEED={RANDOM_SEED})")
        code, output = kill_after(target, report, delay, big=True)
        assert code == -signal.SIGKILL, f"{why}: worker exited {code} before the kill:\n{output[-3000:]}"
        assert resumed_lines(report)[-1].startswith(f"# resumed {latest or '-'} "), \
            f"{why}: the run did not resume from {latest}: {resumed_lines(report)[-1]}"
        latest = check_consistent(target, report, True, why)
    assert reported_saves(report), f"no save returned in any of the runs (delays {delays})"
    restart_and_check(target, report, latest, True, f"{target.backend}, after {len(delays)} random kills "
                                                    f"(seed {RANDOM_SEED}, delays {delays})")
