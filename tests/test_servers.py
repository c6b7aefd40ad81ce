"""The test servers' own start-up: ports outside the kernel's ephemeral range, a start
that lost its port to someone else retried on new ports (CI once lost every S3 test to one
``bind: address already in use`` on SeaweedFS's filer port), any other failure raised."""

from __future__ import annotations

import re
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


def _ready(endpoint: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    servers._wait_http(endpoint, process, log_path)


def _dying_start(message: str, launches: list[str]) -> servers.Launch:
    """A server that prints ``message`` and exits at once; each start recorded in ``launches``."""
    def launch() -> tuple[list[str], str]:
        endpoint = f"http://127.0.0.1:{ports.free_port()}"
        launches.append(endpoint)
        return _script(f"print({message!r}); raise SystemExit(255)"), endpoint
    return launch


def test_a_start_that_lost_its_port_is_retried_on_new_ports(tmp_path: Path) -> None:
    launches: list[str] = []
    clash = _dying_start("listen tcp: bind: address already in use", launches)

    def launch() -> tuple[list[str], str]:
        if not launches:
            return clash()
        port = ports.free_port()
        launches.append(f"http://127.0.0.1:{port}")
        return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], launches[-1]

    with servers._serve("toy", tmp_path, launch, _ready) as server:
        assert server.endpoint == launches[1] and len(launches) == 2
        assert server.process.poll() is None
    assert server.process.poll() is not None  # stopped by its PID on the way out


@pytest.mark.parametrize(("message", "starts"), [
    ("flag provided but not defined: -volume.max", 1),  # raised at once
    ("bind: address already in use", servers.START_ATTEMPTS),  # raised after the last attempt (Go)
    ("Address already in use", servers.START_ATTEMPTS),  # (werkzeug, under moto_server)
])
def test_a_start_that_keeps_failing_is_raised_with_its_log(tmp_path: Path, message: str, starts: int) -> None:
    launches: list[str] = []
    with pytest.raises(RuntimeError, match=re.escape(message)), \
            servers._serve("toy", tmp_path, _dying_start(message, launches), _ready):
        pass
    assert len(launches) == starts
