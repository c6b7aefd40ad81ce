"""Check that the running virtual environment holds exactly what a lock file pins.

``./run`` calls it with the venv's own interpreter after every install and before every
use, so a venv that drifted (a hand-run ``pip install``, an interrupted set-up, a lock
that changed under it) is rebuilt instead of silently testing other versions. Exactly
means both ways: every locked package at its locked version, and nothing installed that
the lock does not name, apart from the project itself (installed editable on top).

Standard library only: it runs before anything else is known to be installed.

    python locks/check_venv.py locks/dev.txt [--project cloudckpt]

Exit status 0 when the venv matches; 1 with one line per difference otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

#: ``name==version`` at the start of a line of a uv/pip-compile lock (hashes follow on ``\\`` lines).
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name normalisation: ``Foo_Bar.baz`` and ``foo-bar-baz`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock_file: Path) -> dict[str, str]:
    """The ``{normalized name: version}`` pins of a lock file."""
    pins: dict[str, str] = {}
    for line in lock_file.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    if not pins:
        raise SystemExit(f"{lock_file}: no name==version pins found - not a lock file")
    return pins


def installed() -> dict[str, str]:
    """The ``{normalized name: version}`` of every distribution this interpreter sees."""
    return {normalize(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def differences(pins: dict[str, str], present: dict[str, str], project: str) -> list[str]:
    """Human-readable differences between a lock's pins and what is installed."""
    problems = []
    for name, version in sorted(pins.items()):
        if name not in present:
            problems.append(f"missing: {name}=={version}")
        elif present[name] != version:
            problems.append(f"wrong version: {name}=={present[name]} installed, the lock pins {version}")
    for name, version in sorted(present.items()):
        if name not in pins and name != normalize(project):
            problems.append(f"not in the lock: {name}=={version}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lock", type=Path, help="the lock file, e.g. locks/dev.txt")
    parser.add_argument("--project", default="cloudckpt", help="the project's own name, allowed on top of the lock")
    args = parser.parse_args(argv)
    problems = differences(locked(args.lock), installed(), args.project)
    for problem in problems:
        print(f"{sys.prefix}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
