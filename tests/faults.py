"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real server, for tests.

::

    with FaultProxy(mlflow_server.url) as proxy:
        tracker = MLflowExperimentTracker(experiment_name="x", tracking_uri=proxy.url)
        proxy.fail(503, path="log-batch")          # every matching request, until switched
        ...
        proxy.wait_for(lambda: proxy.failed >= 3)  # synchronise on what the proxy saw
        proxy.pass_through()

Each client connection gets a thread that parses one request at a time (request line,
headers, a ``Content-Length`` or chunked body), decides what to do with it, and loops while
the client keeps the connection alive. A forwarded request goes to the upstream server over
a kept-alive ``http.client`` connection of that thread; the whole response is read and
written back with a ``Content-Length``.

Modes, switched at runtime from any thread, each for the next ``count`` matching requests
(``None``: until switched) and only for paths containing ``path`` (``None``: every path);
requests that do not match are passed through:

* :meth:`FaultProxy.pass_through`: forward everything.
* :meth:`FaultProxy.fail`: answer a status (500, 429 with ``Retry-After``, 503...) without
  forwarding.
* :meth:`FaultProxy.delay`: forward, then hold the response ``seconds`` before writing it
  (or hold the request before forwarding it, with ``before=True``).
* :meth:`FaultProxy.hold`: hold the request, before forwarding it, until
  :meth:`FaultProxy.release`.
* :meth:`FaultProxy.drop`: close the connection without answering: ``"mid_request"`` after
  part of the body, ``"after_request"`` after the whole request (never forwarded),
  ``"after_forward"`` after the upstream stored it (only the response is lost).

Stdlib only. Counters (``seen``, ``forwarded``, ``failed``, ``delayed``, ``dropped``,
``upstream_errors``) and ``records`` are updated under one condition, which
:meth:`FaultProxy.wait_for` waits on.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Literal, NoReturn
from urllib.parse import urlsplit

__all__ = ["DropStage", "FaultProxy", "Record", "wait_until"]

_HOST = "127.0.0.1"
_POLL = 0.02  # seconds between two looks at a predicate that no proxy event announces
_MAX_LINE = 65536
# Headers that describe one hop, not the message: never relayed as they came.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "expect",
    }
)

DropStage = Literal["mid_request", "after_request", "after_forward"]
_DROP_STAGES = ("mid_request", "after_request", "after_forward")


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends, then half-close ``dst`` (a TCP relay's
    one direction)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not true after {timeout} s: {what or predicate!r}")
        time.sleep(_POLL)


@dataclass(frozen=True)
class Record:
    """What the proxy did with one request, noted as soon as that is decided (a delay when
    it starts). A request held before forwarding that then meets a dead upstream has two."""

    method: str
    path: str
    # "forwarded", "failed 500", "dropped mid_request", "delayed 2 s after",
    # "upstream error ConnectionRefusedError"
    outcome: str


@dataclass
class _Fault:
    kind: Literal["fail", "delay", "drop"]
    path: str | None
    remaining: int | None
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    seconds: float = 0.0
    before: bool = False
    stage: DropStage = "after_request"
    gate: threading.Event | None = None  # a hold: the request waits until it is set

    def matches(self, path: str) -> bool:
        return self.path is None or self.path in path


class _Dropped(Exception):
    """The handler closed the client connection on purpose."""


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 to ``upstream`` (``http://host:port``) that injects faults.

    A context manager: entering starts it, leaving stops it (open connections are closed,
    responses being delayed are cut short).
    """

    def __init__(self, upstream: str, *, port: int = 0, upstream_timeout: float = 60.0) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream
        self._upstream_host = split.hostname
        self._upstream_port = split.port or 80
        self._upstream_timeout = upstream_timeout
        self._requested_port = port
        self._port = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._fault: _Fault | None = None
        self._gates: list[threading.Event] = []
        self._clients: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        # Counters, written under self._changed.
        self.seen = 0  # requests read (at least their headers)
        self.forwarded = 0  # requests the upstream answered, whatever became of the answer
        self.failed = 0  # faults injected: statuses answered and connections dropped
        self.delayed = 0  # responses (or requests) held back, by delay() or hold()
        self.dropped = 0  # connections closed on purpose
        self.upstream_errors = 0  # upstream unreachable: answered 502
        self.statuses: Counter[int] = Counter()  # injected statuses
        self.records: list[Record] = []

    def __repr__(self) -> str:
        return f"FaultProxy(url={self.url!r}, upstream={self.upstream!r}, fault={self._fault})"

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("FaultProxy is not started")
        return f"http://{_HOST}:{self._port}"

    def start(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_HOST, self._requested_port))
        listener.listen(64)
        listener.settimeout(0.1)  # so the accept loop sees stop() promptly
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fault-proxy-{self._port}", daemon=True
        )
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every client connection and wait for the handlers."""
        self._stopping.set()
        self.release()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._changed:
            clients, handlers = list(self._clients), list(self._handlers)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ modes

    def pass_through(self) -> None:
        """Forward every request from now on (requests being delayed finish their delay)."""
        self._set(None)

    def fail(
        self,
        status: int,
        *,
        count: int | None = None,
        path: str | None = None,
        retry_after: float | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer ``status`` without forwarding (``Retry-After`` if given)."""
        headers = [("Content-Type", "application/json")]
        if retry_after is not None:
            headers.append(("Retry-After", f"{retry_after:g}"))
        if body is None:
            reason = http.client.responses.get(status, "Error")
            body = f'{{"error_code": "INJECTED_FAULT", "message": "{status} {reason}"}}'.encode()
        self._set(_Fault("fail", path, count, status=status, headers=tuple(headers), body=body))

    def delay(
        self,
        seconds: float,
        *,
        count: int | None = None,
        path: str | None = None,
        before: bool = False,
    ) -> None:
        """Hold each matching response ``seconds`` after the upstream answered (the request
        is stored, only the answer is late); ``before=True`` holds the request instead."""
        self._set(_Fault("delay", path, count, seconds=seconds, before=before))

    def hold(self, *, count: int | None = None, path: str | None = None) -> None:
        """Hold each matching request, before forwarding it, until :meth:`release` (so a
        test decides when a request the client gave up on reaches the server)."""
        gate = threading.Event()
        with self._changed:
            self._gates.append(gate)
        self._set(_Fault("delay", path, count, seconds=math.inf, before=True, gate=gate))

    def release(self) -> None:
        """Let every request held so far go on to the upstream (the mode is unchanged)."""
        with self._changed:
            gates, self._gates = self._gates, []
        for gate in gates:
            gate.set()

    def drop(
        self,
        stage: DropStage = "after_request",
        *,
        count: int | None = None,
        path: str | None = None,
    ) -> None:
        """Close matching connections without answering, at ``stage``."""
        if stage not in _DROP_STAGES:
            raise ValueError(f"stage must be one of {_DROP_STAGES}, got {stage!r}")
        self._set(_Fault("drop", path, count, stage=stage))

    def _set(self, fault: _Fault | None) -> None:
        if fault is not None and fault.remaining is not None and fault.remaining < 1:
            raise ValueError(f"count must be positive, got {fault.remaining}")
        with self._changed:
            self._fault = fault
            self._changed.notify_all()

    @property
    def mode(self) -> str:
        fault = self._fault
        return "pass-through" if fault is None else fault.kind

    def _take_fault(self, path: str) -> _Fault | None:
        """The fault for this request, if any; counts it against the fault's ``count``."""
        with self._changed:
            fault = self._fault
            if fault is None or not fault.matches(path):
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = None
            return fault

    # ------------------------------------------------------------------ observing

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30.0) -> None:
        """Block until ``predicate()`` is true (re-checked on every proxy event, and a few
        times a second for predicates about other things); ``TimeoutError`` at the deadline."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"not true after {timeout} s: {predicate!r}; proxy saw {self.counts()}"
                    )
                self._changed.wait(min(remaining, 0.1))

    def counts(self) -> dict[str, int]:
        """The counters, as a dict (for messages)."""
        with self._changed:
            return {
                "seen": self.seen,
                "forwarded": self.forwarded,
                "failed": self.failed,
                "delayed": self.delayed,
                "dropped": self.dropped,
                "upstream_errors": self.upstream_errors,
            }

    def count(self, path: str = "", outcome: str = "") -> int:
        """Requests whose path contains ``path`` and whose outcome starts with ``outcome``."""
        with self._changed:
            return sum(1 for r in self.records if path in r.path and r.outcome.startswith(outcome))

    def _note(
        self, method: str, path: str, outcome: str, status: int = 0, **increments: int
    ) -> None:
        with self._changed:
            if status:
                self.statuses[status] += 1
            for name, amount in increments.items():
                setattr(self, name, getattr(self, name) + amount)
            if outcome:
                self.records.append(Record(method, path, outcome))
            self._changed.notify_all()

    # ------------------------------------------------------------------ serving

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(sock,), name="fault-proxy-conn", daemon=True
            )
            with self._changed:
                self._clients.add(sock)
                self._handlers.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        upstream: http.client.HTTPConnection | None = None
        try:
            while not self._stopping.is_set():
                keep_alive, upstream = self._one_request(sock, rfile, upstream)
                if not keep_alive:
                    break
        except (_Dropped, OSError, http.client.HTTPException, ValueError):
            pass  # the client went away, or sent something this proxy does not speak
        finally:
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            rfile.close()
            sock.close()
            with self._changed:
                self._clients.discard(sock)
                self._handlers.discard(threading.current_thread())

    def _one_request(
        self,
        sock: socket.socket,
        rfile: IO[bytes],
        upstream: http.client.HTTPConnection | None,
    ) -> tuple[bool, http.client.HTTPConnection | None]:
        """Handle one request; return whether to keep the connection, and the upstream one."""
        line = rfile.readline(_MAX_LINE)
        if not line:
            return False, upstream  # the client closed the connection
        if not line.strip():
            return True, upstream  # a stray CRLF between requests
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers = http.client.parse_headers(rfile)
        self._note(method, target, "", seen=1)
        fault = self._take_fault(target)

        if fault is not None and fault.kind == "drop" and fault.stage == "mid_request":
            length = int(headers.get("Content-Length") or 0)
            if length > 1:
                rfile.read(length // 2)
            self._drop(sock, method, target, fault)

        if headers.get("Expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _read_body(rfile, headers)
        keep_alive = _wants_keep_alive(version, headers)

        if fault is not None and fault.kind == "drop" and fault.stage == "after_request":
            self._drop(sock, method, target, fault)
        if fault is not None and fault.kind == "fail":
            self._note(method, target, f"failed {fault.status}", failed=1, status=fault.status)
            _write(sock, fault.status, list(fault.headers), fault.body, keep_alive, method)
            return keep_alive, upstream
        delay = fault if fault is not None and fault.kind == "delay" else None
        if delay is not None and delay.before:
            if delay.gate is not None:
                self._note(method, target, "held", delayed=1)
                while not (delay.gate.wait(0.05) or self._stopping.is_set()):
                    pass
            else:
                self._note(method, target, f"delayed {delay.seconds:g} s before", delayed=1)
                self._stopping.wait(delay.seconds)

        try:
            status, resp_headers, resp_body, upstream = self._forward(
                upstream, method, target, headers, body
            )
        except (OSError, http.client.HTTPException) as exc:
            self._note(method, target, f"upstream error {type(exc).__name__}", upstream_errors=1)
            message = f'{{"error_code": "BAD_GATEWAY", "message": "{type(exc).__name__}"}}'
            _write(sock, 502, [("Content-Type", "application/json")], message.encode(), False, "")
            return False, None

        if fault is not None and fault.kind == "drop":  # after_forward: the answer is lost
            self._note(method, target, "", forwarded=1)
            self._drop(sock, method, target, fault)
        if delay is None:
            self._note(method, target, "forwarded", forwarded=1)
        elif delay.before:
            self._note(method, target, "", forwarded=1)
        else:  # noted before the wait, so a waiter sees the response being held
            self._note(method, target, f"delayed {delay.seconds:g} s after", forwarded=1, delayed=1)
            self._stopping.wait(delay.seconds)
        _write(sock, status, resp_headers, resp_body, keep_alive, method)
        return keep_alive, upstream

    def _drop(self, sock: socket.socket, method: str, target: str, fault: _Fault) -> NoReturn:
        self._note(method, target, f"dropped {fault.stage}", failed=1, dropped=1)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise _Dropped

    def _forward(
        self,
        upstream: http.client.HTTPConnection | None,
        method: str,
        target: str,
        headers: http.client.HTTPMessage,
        body: bytes,
    ) -> tuple[int, list[tuple[str, str]], bytes, http.client.HTTPConnection | None]:
        relay = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        # A kept-alive upstream connection the server closed while idle fails on first use;
        # that one request goes again on a fresh connection.
        for reused in (upstream is not None, False):
            if upstream is None:
                upstream = http.client.HTTPConnection(
                    self._upstream_host, self._upstream_port, timeout=self._upstream_timeout
                )
            try:
                payload = body if body or method not in ("GET", "HEAD") else None
                upstream.request(method, target, body=payload, headers=relay)
                response = upstream.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                upstream.close()
                upstream = None
                if reused:
                    continue
                raise
            resp_headers = [
                (k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP
            ]
            if method == "HEAD":
                length = response.getheader("Content-Length")
                if length is not None:
                    resp_headers.append(("Content-Length", length))
            if response.will_close:
                upstream.close()
                upstream = None
            return response.status, resp_headers, data, upstream
        raise AssertionError("unreachable")


def _read_body(rfile: IO[bytes], headers: http.client.HTTPMessage) -> bytes:
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size_line = rfile.readline(_MAX_LINE)
            if not size_line:
                raise ConnectionError("client closed mid-chunk")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while rfile.readline(_MAX_LINE).strip():  # trailers, up to the blank line
                    pass
                return b"".join(chunks)
            chunks.append(_read_exactly(rfile, size))
            rfile.readline(_MAX_LINE)  # the CRLF after the chunk
    length = int(headers.get("Content-Length") or 0)
    return _read_exactly(rfile, length) if length else b""


def _read_exactly(rfile: IO[bytes], size: int) -> bytes:
    data = rfile.read(size)
    if len(data) < size:
        raise ConnectionError("client closed mid-body")
    return data


def _wants_keep_alive(version: str, headers: http.client.HTTPMessage) -> bool:
    connection = headers.get("Connection", "").lower()
    if version.upper() == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def _write(
    sock: socket.socket,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    keep_alive: bool,
    method: str,
) -> None:
    reason = http.client.responses.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    if method != "HEAD":
        lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sock.sendall(head if method == "HEAD" else head + body)
