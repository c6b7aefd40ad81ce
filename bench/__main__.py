"""``python -m bench SUITE [options]`` (``./run bench SUITE``) - see docs/benchmarks.md.

Suites import lazily, so one whose peers are missing from the environment does not stop the others.
``tfimport`` needs TensorFlow, in its own environment: run it as ``./run bench tfimport``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

#: Suite name -> module under bench/ with a ``main(argv) -> int``.
SUITES = {
    "storage": "bench_storage",
    "checkpoint": "bench_checkpoint",
    "distributed": "bench_distributed",
    "index": "bench_index",
    "incremental": "bench_incremental",
    "dcp": "bench_dcp",
    "scale": "bench_scale",
    "tfimport": "bench_tf_import",
    "crc32c": "bench_crc32c",
    "reshard": "bench_reshard",
    "cpu": "bench_cpu",
    "jax": "bench_jax",
    "gpu": "bench_gpu",
    "frameworks": "bench_frameworks",
    "tiers": "bench_tiers",
}


def main(argv: list[str]) -> int:
    which = argv[0] if argv and not argv[0].startswith("-") else "storage"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    if which == "all":
        return max(_suite(name)(rest) for name in SUITES if name != "tfimport")  # tfimport: its own venv
    if which not in SUITES:
        print(f"unknown benchmark {which!r}; choose from {sorted(SUITES)} or 'all'", file=sys.stderr)
        return 2
    return _suite(which)(rest)


def _suite(name: str) -> Callable[[list[str]], int]:
    main_of: Callable[[list[str]], int] = importlib.import_module(f"bench.{SUITES[name]}").main
    return main_of


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
