"""A tiny fault-injecting HTTP proxy for S3 tests (stdlib only, loopback only).

It sits between a client and a real S3 server (SeaweedFS, moto) and, for requests
matching a rule, answers with an error status, resets the connection, forwards the
request and then drops the server's answer - the trap of conditional writes: the client
cannot know that its write landed - holds the answer past the client's read timeout, or
plays a store that ignores ``If-None-Match`` / ``If-Match`` (the server's 412 becomes a
200; the headers themselves cannot be stripped, they are signed). It can also shift the
``Date`` of every answer, as a store whose clock differs from the client's. Everything
else is forwarded unchanged.

``ProxyFaults`` drives it from the storage contract's ``Faults`` (verbs and keys, see
``cloudckpt.testing.faults``): a ``classify`` function names the verb and key of each
request.

Bounded: every socket has a timeout, a held response is held for a bounded time, and
``stop()`` shuts every client connection and joins the server thread with a timeout.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from cloudckpt.testing.faults import Faults

SOCKET_TIMEOUT = 30.0
Action = Literal["status", "reset", "drop_response", "hold_response", "ignore_conditions", "delay"]

#: Hop-by-hop headers (and ones this proxy re-computes) that are never forwarded.
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                          "expect", "te", "trailer", "upgrade", "content-length"})


@dataclass
class Rule:
    """Apply ``action`` to the next ``times`` requests that match.

    A request matches when its method equals ``method`` (if given) and its path+query
    contains ``contains`` (if given).
    """

    action: Action
    times: int = 1
    method: str | None = None
    contains: str | None = None
    status: int = 503
    code: str = "SlowDown"
    hold_seconds: float = 3.0
    message: str = "injected by faultproxy"

    def matches(self, method: str, target: str) -> bool:
        return (self.times > 0 and (self.method is None or self.method == method)
                and (self.contains is None or self.contains in target))


@dataclass(frozen=True)
class Request:
    """What a ``classify`` function sees of one request: the path is percent-decoded."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased


#: ``Request`` -> every ``(verb, key)`` it acts on (a bulk delete names several keys).
Classify = Callable[[Request], list[tuple[str, str]]]


class RequestPolicy(Protocol):
    """What a ``FaultProxy`` asks about each request before its own rules: a rule to apply, or ``None``.

    ``ProxyFaults`` (the storage contract's faults) is one; ``bench/throttle_proxy.py``'s
    per-prefix token buckets are another.
    """

    def action_for(self, request: Request) -> Rule | None: ...


class ProxyFaults(Faults):
    """The contract's ``Faults``, applied by a ``FaultProxy`` to the requests ``classify`` names.

    ``fail`` alternates a ``500 InternalError`` and a connection reset; ``throttle`` answers
    ``503 SlowDown``; ``lose_answer`` forwards the request and resets the connection instead
    of relaying the answer; ``deny`` answers ``403 AccessDenied``.
    """

    def __init__(self, proxy: FaultProxy, classify: Classify) -> None:
        super().__init__()
        self._proxy = proxy
        self._classify = classify
        self._failures = 0
        proxy.faults = self

    def action_for(self, request: Request) -> Rule | None:
        kinds = [self.decide(verb, key) for verb, key in self._classify(request)]
        kind = next((k for k in kinds if k is not None), None)
        if kind == "fail":
            with self._lock:
                self._failures += 1
                reset = self._failures % 2 == 0
            return Rule("reset") if reset else Rule("status", status=500, code="InternalError")
        if kind == "throttle":
            return Rule("status", status=503, code="SlowDown")
        if kind == "lose_answer":
            return Rule("drop_response")
        if kind == "deny":
            return Rule("status", status=403, code="AccessDenied")
        return None

    def skew_clock(self, delta: timedelta) -> bool:
        self._proxy.clock_skew = delta
        return True


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it, and what it did with it."""

    method: str
    target: str
    action: str


class _QuietServer(ThreadingHTTPServer):
    """Connections reset on purpose end in errors; they are expected, not news."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class FaultProxy:
    """``with FaultProxy(upstream) as proxy: ...`` - point the client at ``proxy.endpoint``."""

    def __init__(self, upstream: str, *, record: bool = True) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.faults: RequestPolicy | None = None
        #: Keep every request in ``seen`` (off for long benchmark runs, whose policy counts instead).
        self.record = record
        self.clock_skew = timedelta(0)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="faultproxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.seen.clear()

    def requests(self, contains: str = "", method: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if contains in s.target and (method is None or s.method == method)]

    def _decide(self, method: str, target: str, body: bytes, headers: dict[str, str]) -> Rule | None:
        if self.faults is not None:
            parts = urlsplit(target)
            query = parse_qs(parts.query, keep_blank_values=True)
            rule = self.faults.action_for(Request(method, unquote(parts.path), query, body, headers))
            if rule is not None:
                with self._lock:
                    self._remember(Seen(method, target, rule.action))
                return rule
        with self._lock:
            for rule in self._rules:
                if rule.matches(method, target):
                    rule.times -= 1
                    self._remember(Seen(method, target, rule.action))
                    return rule
            self._remember(Seen(method, target, "forward"))
            return None

    def _remember(self, seen: Seen) -> None:
        if self.record:
            self.seen.append(seen)

    def _track(self, conn: socket.socket, active: bool) -> None:
        with self._lock:
            (self._connections.add if active else self._connections.discard)(conn)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue handled for us
        timeout = SOCKET_TIMEOUT

        def setup(self) -> None:
            super().setup()
            proxy._track(self.connection, True)

        def finish(self) -> None:
            with contextlib.suppress(OSError):
                super().finish()
            proxy._track(self.connection, False)

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._handle()

        do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        def _handle(self) -> None:
            body = self._read_body()
            if body is None:
                return
            rule = proxy._decide(self.command, self.path, body, {k.lower(): v for k, v in self.headers.items()})
            action = rule.action if rule else None
            if rule is not None and action == "status":
                self._send_error(rule.status, rule.code, rule.message)
                return
            if action == "reset":
                self._reset()
                return
            if rule is not None and action == "delay":  # a slow link: the request arrives late, whole
                time.sleep(min(rule.hold_seconds, SOCKET_TIMEOUT))
            status, reason, headers, data = self._forward(body)
            if action == "ignore_conditions" and status == 412:
                status, reason, headers, data = 200, "OK", [("ETag", '"' + "0" * 32 + '"')], b""
            if rule is not None and action in ("drop_response", "hold_response"):
                if action == "hold_response":
                    time.sleep(min(rule.hold_seconds, SOCKET_TIMEOUT))
                self._reset()
                return
            self._relay(status, reason, headers, data)

        def _read_body(self) -> bytes | None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._send_error(501, "NotImplemented")
                return None
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=SOCKET_TIMEOUT)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                return response.status, response.reason, response.getheaders(), data
            finally:
                conn.close()

        def _relay(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
            self.send_response_only(status, reason)
            for name, value in headers:
                if name.lower() == "date" and proxy.clock_skew:
                    value = _shifted(value, proxy.clock_skew)
                if name.lower() not in _HOP_HEADERS:
                    self.send_header(name, value)
            if self.command == "HEAD":
                length = next((v for k, v in headers if k.lower() == "content-length"), "0")
                self.send_header("Content-Length", length)
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_error(self, status: int, code: str, message: str = "injected by faultproxy") -> None:
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId>"
                       f"</Error>").encode()
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Date", _shifted(self.date_time_string(), proxy.clock_skew))
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _reset(self) -> None:
            """Close with RST: the client sees a reset, never an answer."""
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            self.close_connection = True

    return Handler


def _shifted(date: str, skew: timedelta) -> str:
    """An HTTP ``Date`` value moved by ``skew``."""
    if not skew:
        return date
    return email.utils.format_datetime(email.utils.parsedate_to_datetime(date) + skew, usegmt=True)


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as proxy:
        yield proxy
