"""The test servers' own start-up: ports outside the kernel's ephemeral range, a start
that lost its port to someone else retried on new ports (CI once lost every S3 test to one
``bind: address already in use`` on SeaweedFS's filer port), any other failure raised."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import servers

from cloudckpt.testing import ports


def test_free_ports_lie_below_the_ephemeral_range_are_bindable_and_distinct() -> None:
    drawn = [ports.free_port() for _ in range(50)]
    assert len(set(drawn)) == len(drawn)
    low = ports.ephemeral_low()
    assert all(ports.LOWEST_PORT <= port < low for port in drawn), (low, drawn)
    for port in drawn[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", port))


def test_a_port_someone_listens_on_is_never_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", ports.free_port()))
        holder.listen()
        held = holder.getsockname()[1]
        ports._taken.discard(held)
        monkeypatch.setattr(ports._draw, "randint", lambda _low, _high: held)
        port = ports.free_port()  # every draw hits the held port: the kernel's choice instead
    assert port != held


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_start_that_lost_its_port_is_retried_on_new_ports(tmp_path: Path) -> None:
    launches: list[str] = []

    def launch() -> tuple[list[str], str]:
        port = ports.free_port()
        endpoint = f"http://127.0.0.1:{port}"
        launches.append(endpoint)
        if len(launches) == 1:
            return _script("print('listen tcp: bind: address already in use'); raise SystemExit(255)"), endpoint
        return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], endpoint

    def ready(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        servers._wait_http(endpoint, process, log_path)

    with servers._serve("toy", tmp_path, launch, ready) as server:
        assert server.endpoint == launches[1] and len(launches) == 2
        assert server.process.poll() is None
    assert server.process.poll() is not None  # stopped by its PID on the way out


def test_any_other_start_failure_is_raised_at_once(tmp_path: Path) -> None:
    launches: list[int] = []

    def launch() -> tuple[list[str], str]:
        launches.append(1)
        return _script("print('no such flag: -volume.max'); raise SystemExit(2)"), "http://127.0.0.1:1"

    def ready(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        servers._wait_http(endpoint, process, log_path)

    with pytest.raises(RuntimeError, match="no such flag"), servers._serve("toy", tmp_path, launch, ready):
        pass
    assert len(launches) == 1


def test_a_port_clash_on_every_attempt_is_raised_after_the_last(tmp_path: Path) -> None:
    launches: list[int] = []

    def launch() -> tuple[list[str], str]:
        launches.append(1)
        return _script("print('bind: address already in use'); raise SystemExit(255)"), "http://127.0.0.1:1"

    def ready(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        servers._wait_http(endpoint, process, log_path)

    with pytest.raises(RuntimeError, match="address already in use"), servers._serve("toy", tmp_path, launch, ready):
        pass
    assert len(launches) == servers.START_ATTEMPTS
