"""The storage contract catches a broken backend: many of its tests fail, not one.

A contract that a backend with a real bug passes proves nothing. Each broken variant
here runs the whole contract (``cloudckpt.testing.store_tests``) in a child pytest, the
way a third-party backend would, and must fail a good share of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

#: Each variant: the broken subclass of the fsspec backend, and how many tests must fail at least.
BROKEN = {
    # Every key lands at the file system's root instead of under the store's prefix.
    "drops its key prefix": ('''
        @property
        def _prefix(self) -> str:
            return ""
    ''', 15),
    # Nothing is ever retried: every injected transient failure surfaces.
    "retries nothing": ('''
        def _is_transient(self, exc: BaseException) -> bool:
            return False
    ''', 8),
    # Deletes report success and leave the objects in place.
    "ignores deletes": ('''
        def _delete_many(self, full_keys) -> None:
            pass
    ''', 3),
}

MODULE = '''
import uuid

import pytest

from cloudckpt.storage.fsspec_store import FsspecStorage
from cloudckpt.testing.faults import PrimitiveFaults
from cloudckpt.testing.store_tests import CONTRACT_CONFIG
from test_storage_fsspec import TestMemoryFsspec as _Correct


class Broken(FsspecStorage):
{body}


def broken(root):
    return Broken(f"memory://{{root}}-{{uuid.uuid4().hex[:8]}}/prefix", config=CONTRACT_CONFIG)


class TestBroken(_Correct):
    @pytest.fixture
    def store(self):
        yield broken("broken")

    @pytest.fixture
    def faulty(self):
        storage = broken("broken-faulty")
        yield storage, PrimitiveFaults(storage, lambda: ConnectionResetError("injected"))

    @pytest.fixture
    def missing_bucket_store(self):
        yield broken("broken-never-written")
'''


def run_contract(tmp_path: Path, body: str) -> tuple[int, int]:
    """(tests run, tests failed) of the whole contract against ``Broken``."""
    module = tmp_path / "test_broken_backend.py"
    module.write_text(MODULE.format(body=textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")))
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(module), "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         f"--rootdir={tmp_path}", "-o", "addopts="],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.exists(), result.stdout + result.stderr
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return int(suite.get("tests", 0)), failed


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_a_broken_backend_fails_many_contract_tests(tmp_path: Path, bug: str) -> None:
    body, at_least = BROKEN[bug]
    ran, failed = run_contract(tmp_path, body)
    assert ran >= 50  # the whole contract ran
    print(f"a backend that {bug} failed {failed} of {ran} contract tests")
    assert failed >= at_least, f"a backend that {bug} failed only {failed} of {ran} contract tests"


def test_the_correct_backend_passes_the_same_run(tmp_path: Path) -> None:
    """The harness itself: with nothing broken, nothing fails."""
    ran, failed = run_contract(tmp_path, "pass")
    assert ran >= 50 and failed == 0
