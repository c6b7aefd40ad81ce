"""``bench cpu``'s work in child interpreters: py-spy profiles of cloudckpt per phase, first requests.

Why children: a profile must see one phase's threads only, and a first request is only first in
a fresh interpreter (client creation, connection, TLS, probes); both would be hidden by the
warm process that times the table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 600.0


PROFILE_CHILD = """
import sys, numpy as np, cloudckpt
from bench.bench_checkpoint import make_state
size_mib, url, phase, runs = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
state = make_state(size_mib * 1024 * 1024)
dest = {k: np.zeros_like(v) for k, v in state.items()}
writer, reader = cloudckpt.Checkpoint(state=state), cloudckpt.Checkpoint(state=dest)
writer.write(url)  # clients, probes: in both profiles, once
for i in range(runs):
    writer.write(url) if phase == "save" else reader.read(url)
"""


def profile_ours(protocol: str, bucket: str, size_mib: int, out_dir: Path, runs: int = 3) -> None:
    """py-spy (every thread, idle ones left out) over a child that saves ``runs`` times, then over one
    that saves once and restores ``runs`` times: where each phase's CPU goes, as folded stacks."""
    py_spy = Path(sys.executable).parent / "py-spy"
    for phase in ("save", "restore"):
        out = out_dir / f"profile-{protocol}-{phase}.txt"
        argv = [str(py_spy), "record", "--format", "raw", "--rate", "250", "--output", str(out), "--",
                sys.executable, "-c", PROFILE_CHILD, str(size_mib), f"s3://{bucket}/profile-{protocol}-{phase}/ckpt",
                phase, str(runs)]
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
        if proc.returncode != 0 or not out.exists():
            print(f"  py-spy failed ({proc.returncode}): {proc.stderr[-1500:]}", flush=True)
            continue
        print(f"  {protocol} {phase} x{runs}: folded stacks in {out}; self time by function:", flush=True)
        print(summarize_profile(out), flush=True)


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self time by function (the leaf frame of each folded stack), as % of all samples."""
    selfs: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        leaf = stack.split(";")[-1]
        selfs[leaf] = selfs.get(leaf, 0) + count
    ranked = sorted(selfs.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"    {100 * n / max(total, 1):5.1f} %  {name}" for name, n in ranked)


FIRST_CHILD = """
import json, sys, time, numpy as np
from bench.bench_checkpoint import first_state
key, phase, bucket, endpoint = sys.argv[1:5]
state = first_state()
if key == "ours":
    import cloudckpt
else:
    import obstore
    from bench.ckpt_paths import Setup, _obstore
    blob = b"".join(memoryview(a).cast("B") for a in state.values())
started = time.perf_counter()
if key == "ours":
    if phase == "save":
        cloudckpt.Checkpoint(state=state).write(f"s3://{bucket}/first/ckpt")
    else:
        dest = {k: np.zeros_like(v) for k, v in state.items()}
        cloudckpt.Checkpoint(state=dest).read(f"s3://{bucket}/first/ckpt").assert_consumed()
else:
    store = _obstore(Setup(state, state, None, endpoint, bucket))
    if phase == "save":
        obstore.put(store, "first/state.bin", blob, use_multipart=False)
    else:
        obstore.get(store, "first/state.bin").bytes()
print(json.dumps(time.perf_counter() - started))
"""


def first_request(key: str, bucket: str, endpoint: str) -> tuple[float, float]:
    """Seconds of the first save and the first restore, each in a fresh interpreter (imports untimed)."""
    seconds = []
    for phase in ("save", "restore"):
        proc = subprocess.run([sys.executable, "-c", FIRST_CHILD, key, phase, bucket, endpoint], cwd=REPO,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"first-request child {key} {phase} failed:\n{proc.stderr[-2000:]}")
        seconds.append(float(proc.stdout.strip().splitlines()[-1]))
    return seconds[0], seconds[1]
