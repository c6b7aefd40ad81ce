"""Free TCP ports on 127.0.0.1 for servers and rendezvous that tests start.

A port from ``bind(("127.0.0.1", 0))`` lies in the kernel's ephemeral range, where any
outgoing connection may be given it in the moment between our probe closing it and the
server binding it - a server's own parts connecting to each other while it starts
included (CI met ``bind: address already in use`` on SeaweedFS's filer port this way).
Ports are therefore drawn below that range, where the kernel never hands out a port
on its own, and probed with a bind before they are returned.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10000
DRAW_ATTEMPTS = 200

_taken: set[int] = set()
_draw = random.Random()


def ephemeral_low() -> int:
    """The lowest port the kernel hands out on its own (Linux's default when unreadable)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port no one listens on, below the ephemeral range, not handed out before by this process.

    Falls back to a kernel-chosen port when the range below the ephemeral one is too narrow
    or ``DRAW_ATTEMPTS`` draws found nothing bindable.
    """
    high = ephemeral_low() - 1
    if high - LOWEST_PORT > DRAW_ATTEMPTS:
        for _ in range(DRAW_ATTEMPTS):
            port = _draw.randint(LOWEST_PORT, high)
            if port not in _taken and _bindable(port):
                _taken.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
