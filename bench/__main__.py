"""``python -m bench [storage|checkpoint|distributed|crc32c|all] [options]`` - see docs/benchmarks.md."""

from __future__ import annotations

import sys

from bench import bench_crc32c, bench_storage


def main(argv: list[str]) -> int:
    which = argv[0] if argv and not argv[0].startswith("-") else "storage"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    suites = {"storage": bench_storage.main, "crc32c": bench_crc32c.main}
    try:
        from bench import bench_checkpoint
        suites["checkpoint"] = bench_checkpoint.main
    except ImportError:
        pass
    try:
        from bench import bench_distributed
        suites["distributed"] = bench_distributed.main
    except ImportError:
        pass
    if which == "all":
        return max(run(rest) for run in suites.values())
    if which not in suites:
        print(f"unknown benchmark {which!r}; choose from {sorted(suites)} or 'all'", file=sys.stderr)
        return 2
    return suites[which](rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
