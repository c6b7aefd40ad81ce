"""Run one function in N spawned processes (a ``torch.distributed`` group) and collect their reports.

Shared by the multi-host tests and the multi-host benchmark, and shipped so users can test
their own multi-host checkpointing the same way. Each process calls
``target(rank, world, port, *args, report)``, which fills the ``report`` dict with plain JSON
data; whatever it raises is recorded as a traceback (``report["crash"]``), keeping what it
reported before. Every wait is bounded: processes still alive at the deadline are killed
by PID.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from cloudckpt.testing.ports import free_port


def _child(target: Callable[..., None], rank: int, world: int, port: int, args: tuple[Any, ...], out: str) -> None:
    """Runs in the spawned process: the target, then its report (or its crash) as JSON."""
    report: dict[str, Any] = {"rank": rank}
    try:
        target(rank, world, port, *args, report)
    except BaseException:
        report["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


def spawn_reports(target: Callable[..., None], world: int, *args: Any, timeout: float,
                  may_die: Collection[int] = ()) -> list[dict[str, Any]]:
    """Run ``target`` in ``world`` spawned processes; their reports, by rank.

    ``may_die``: ranks a test kills on purpose (a SIGKILL mid-save); one that wrote no
    report gets ``{"rank": r, "died": exit code}`` instead of failing the run.

    Raises:
        RuntimeError: a rank wrote no report (it died or hit ``timeout``) or reported a crash.
    """
    context = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cloudckpt-spawn-") as out:
        # Not daemonic: a daemonic process may not start children, and a rank may (DCP's
        # AsyncCheckpointerType.PROCESS spawns a checkpoint process). Every rank is joined or
        # killed below, so none outlives this call.
        procs = [context.Process(target=_child, args=(target, rank, world, port, args, out))
                 for rank in range(world)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        reports = []
        for rank in range(world):
            file = Path(out, f"rank{rank}.json")
            if not file.exists() and rank in may_die and procs[rank].exitcode is not None:
                reports.append({"rank": rank, "died": procs[rank].exitcode})
                continue
            if not file.exists():
                raise RuntimeError(f"world {world}: rank {rank} wrote no report (exit code {procs[rank].exitcode}; "
                                   f"timeout {timeout:.0f} s)")
            reports.append(json.loads(file.read_text()))
    for report in reports:
        if "crash" in report:
            raise RuntimeError(f"world {world}: rank {report.get('rank')} failed:\n{report['crash']}")
    return reports
