"""CRC32C throughput on one core: the ``crc32c`` package that cloudckpt uses against the alternatives.

Over ``--size-mib`` of random bytes in one numpy array (as a restore sees them: memory
the CRC reads in place), best of ``--repeat``, pinned to one core (``--core``):

* ``crc32c`` package, one call over the array's memoryview and in 1 MiB slices of it;
* ``google_crc32c`` over one ``bytes`` object (its C extension refuses other buffers; the
  copy into ``bytes`` is not timed) and fed 256 KiB ``bytes`` copies (what cloudckpt did
  before it moved to the ``crc32c`` package);
* ``cloudckpt.storage.checksum.crc32c_of``, the library's entry point.

Every path must produce the same value, or the run fails.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

MiB = 1024 * 1024


def best_of(repeat: int, fn: Callable[[], int]) -> tuple[float, int]:
    best, value = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench crc32c", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--core", type=int, default=0, help="CPU to pin to (-1: do not pin)")
    args = parser.parse_args(argv)
    if args.core >= 0:
        os.sched_setaffinity(0, {args.core})
    import crc32c

    from cloudckpt.storage.checksum import crc32c_of

    size = args.size_mib * MiB
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    view = data.data

    def sliced() -> int:
        value = 0
        for start in range(0, size, MiB):
            value = crc32c.crc32c(view[start:start + MiB], value)
        return value

    paths: list[tuple[str, Callable[[], int]]] = [
        ("crc32c package, one call on the memoryview", lambda: crc32c.crc32c(view)),
        ("crc32c package, 1 MiB slices of the memoryview", sliced),
        ("cloudckpt checksum.crc32c_of", lambda: crc32c_of([view])),
    ]
    try:
        import google_crc32c
    except ImportError:
        print("google_crc32c not installed: its rows are left out")
    else:
        whole = data.tobytes()

        def copies() -> int:
            checksum = google_crc32c.Checksum()
            for start in range(0, size, 256 * 1024):
                checksum.update(bytes(view[start:start + 256 * 1024]))
            return int.from_bytes(checksum.digest(), "big")

        paths += [("google_crc32c.value on one bytes (its copy untimed)", lambda: google_crc32c.value(whole)),
                  ("google_crc32c fed 256 KiB bytes copies", copies)]
    print(f"{args.size_mib} MiB, best of {args.repeat}, core {args.core}, crc32c hardware: {crc32c.hardware_based}, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    values = set()
    for name, fn in paths:
        seconds, value = best_of(args.repeat, fn)
        values.add(value)
        print(f"| {name} | {size / seconds / 1e9:.1f} GB/s | {seconds * 1000:.0f} ms |")
    if len(values) != 1:
        raise SystemExit(f"the paths disagree: {sorted(hex(v) for v in values)}")
    print(f"all paths agree ({values.pop():08x}); load average at end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0
