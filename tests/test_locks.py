"""The locks in locks/: complete, hashed, in step with pyproject.toml, and checked against venvs.

``./run`` installs every environment from its lock with ``--require-hashes --no-deps``, so a
lock that misses a dependency, lacks a hash, or pins a version pyproject.toml no longer allows
(someone edited the ranges and did not run ``./run lock``) must fail here, not on a new machine.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
#: environment -> the pyproject.toml extras its lock is resolved with (``extras_of`` in ./run).
ENVIRONMENTS = {"dev": ("all", "test", "torch"), "bench": ("all", "torch"), "bench-tf": ("s3",)}
#: The machine the locks are resolved for (./run: LOCK_PYTHON_VERSION, LOCK_PLATFORM).
LOCK_MARKERS = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _check_venv() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_venv", LOCKS / "check_venv.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_venv = _check_venv()


def _pins(name: str) -> dict[str, str]:
    return dict(check_venv.locked(LOCKS / f"{name}.txt"))


def _requirements(name: str) -> list[Requirement]:
    """What the lock was resolved from: pyproject.toml's dependencies and extras, and locks/<name>.in."""
    lines: list[str] = []
    if name in ENVIRONMENTS:  # the project's own environments; checkov's and uv's are tools only
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        lines += project["dependencies"]
        for extra in ENVIRONMENTS[name]:
            lines += project["optional-dependencies"][extra]
    for line in (LOCKS / f"{name}.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("name", [*ENVIRONMENTS, "checkov", "uv"])
def test_every_requirement_is_locked_at_an_allowed_version(name: str) -> None:
    pins = _pins(name)
    for requirement in _requirements(name):
        if requirement.marker is not None and not requirement.marker.evaluate(LOCK_MARKERS):
            continue
        key = canonicalize_name(requirement.name)
        assert key in pins, f"locks/{name}.txt lacks {requirement} - run ./run lock"
        assert requirement.specifier.contains(Version(pins[key]), prereleases=True), (
            f"locks/{name}.txt pins {key}=={pins[key]}, outside {requirement} - run ./run lock")


@pytest.mark.parametrize("name", [*ENVIRONMENTS, "checkov", "uv"])
def test_every_pin_carries_a_hash(name: str) -> None:
    text = (LOCKS / f"{name}.txt").read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])  # one block per pin, header dropped
    for block in blocks:
        if "==" in block.split("\n", 1)[0]:
            assert "--hash=sha256:" in block, f"locks/{name}.txt: no hash for {block.splitlines()[0]}"


def test_the_locks_pin_the_tested_torch_and_moto() -> None:
    """The CPU torch build on the machine's disk, and a moto that maps multipart uploads to s3:PutObject."""
    for name in ("dev", "bench"):
        pins = _pins(name)
        assert pins["torch"] == "2.13.0+cpu"
        assert pins["moto"] != "5.2.6"


def test_check_venv_names_every_difference() -> None:
    pins = {"boto3": "1.0", "moto": "5.2.5", "numpy": "2.0"}
    present = {"boto3": "1.0", "moto": "5.2.6", "cloudckpt": "0.1.0", "six": "1.16"}
    assert check_venv.differences(pins, present, "cloudckpt") == [
        "wrong version: moto==5.2.6 installed, the lock pins 5.2.5",
        "missing: numpy==2.0",
        "not in the lock: six==1.16",
    ]
    assert check_venv.differences(pins, {**pins, "cloudckpt": "0.1.0"}, "cloudckpt") == []


def test_check_venv_reads_names_as_pip_does(tmp_path: Path) -> None:
    lock = tmp_path / "x.txt"
    lock.write_text("# header\nPyYAML==6.0.2 \\\n    --hash=sha256:00\n    # via moto\n"
                    "moto[server]==5.2.5 \\\n    --hash=sha256:11\nzope.interface==7.0\n")
    assert check_venv.locked(lock) == {"pyyaml": "6.0.2", "moto": "5.2.5", "zope-interface": "7.0"}


def test_the_test_environment_is_the_locked_one() -> None:
    """./run test runs in .venv, built from locks/dev.txt: this interpreter holds exactly the lock.

    ``./run test --latest`` (.venv-latest, newest releases on purpose) deselects this test and
    prints the comparison instead: there the difference is the point.
    """
    assert check_venv.differences(_pins("dev"), check_venv.installed(), "cloudckpt") == []
