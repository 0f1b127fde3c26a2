"""The lean HTTP client the worker sends batches with, against a recording loopback server.

The real MLflow server exercises it in every delivery test; these check what that server
cannot show: the headers sent, credentials kept out of reprs and errors, a kept-alive
connection the server closed, and which set-ups fall back to MLflow's own ``http_request``.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from mlflow.utils.credentials import get_default_host_creds

from asynctrack._engine import wire
from asynctrack._engine.transport import RestTransport, Transient


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []
    close_after: ClassVar[set[int]] = set()  # request numbers after which the server closes
    answer: ClassVar[tuple[int, dict[str, str]]] = (200, {})  # status and extra headers
    delay: ClassVar[float] = 0.0  # a slow server: seconds before it answers

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay)
        self.seen.append((self.path, dict(self.headers), body))
        payload = b"{}"
        status, extra = self.answer
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        if len(self.seen) in self.close_after:
            self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    _Recorder.seen = []
    _Recorder.close_after = set()
    _Recorder.answer = (200, {})
    _Recorder.delay = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/prefix"
    server.shutdown()
    server.server_close()


def test_basic_auth_sent_and_never_shown(recorder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    creds = get_default_host_creds(recorder)
    assert wire.usable(creds)
    client = wire.Wire(creds, 5.0)
    assert client.post("/api/2.0/mlflow/runs/log-batch", b'{"run_id":"r"}') == (200, "{}")
    path, headers, body = _Recorder.seen[0]
    assert path == "/prefix/api/2.0/mlflow/runs/log-batch"
    assert body == b'{"run_id":"r"}'
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
    assert "mlflow-python-client" in headers["User-Agent"]  # MLflow's header providers ran
    assert "s3cret" not in repr(client) and "alice" not in repr(client)


def test_bearer_token(recorder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    wire.Wire(get_default_host_creds(recorder), 5.0).post("/x", b"{}")
    assert _Recorder.seen[0][1]["Authorization"] == "Bearer tok-123"


def test_connection_kept_alive_and_renewed_when_the_server_closed_it(recorder: str) -> None:
    _Recorder.close_after = {2}
    client = wire.Wire(get_default_host_creds(recorder), 5.0)
    for n in range(5):
        assert client.post("/x", str(n).encode())[0] == 200
    assert [body for _, _, body in _Recorder.seen] == [b"0", b"1", b"2", b"3", b"4"]


def test_unreachable_server_is_transient_and_names_no_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    transport = RestTransport(f"http://127.0.0.1:{port}", 2.0)
    with pytest.raises(Transient) as caught:
        transport.end_run("r" * 32, "FINISHED", 0)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "usable"),
    [
        ({}, True),
        ({"HTTP_PROXY": "http://proxy.invalid:3128"}, False),
        ({"HTTP_PROXY": "http://proxy.invalid:3128", "NO_PROXY": "127.0.0.1"}, True),
        ({"MLFLOW_TRACKING_AUTH": "basic-auth"}, False),
        ({"MLFLOW_TRACKING_AWS_SIGV4": "true"}, False),
    ],
)
def test_per_request_setups_fall_back_to_mlflow(
    recorder: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], usable: bool
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wire.usable(get_default_host_creds(recorder)) is usable
    transport = RestTransport(recorder, 5.0)
    assert (transport._wire is not None) is usable


def test_post_full_reads_retry_after(recorder: str) -> None:
    client = wire.Wire(get_default_host_creds(recorder), 5.0)
    assert client.post_full("/x", b"{}") == (200, "{}", None)
    _Recorder.answer = (429, {"Retry-After": "7"})
    assert client.post_full("/x", b"{}") == (429, "{}", 7.0)
    _Recorder.answer = (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # long past
    assert client.post_full("/x", b"{}") == (503, "{}", 0.0)
    assert client.post("/x", b"{}") == (503, "{}")  # post() answers as before


_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
_DATE_EPOCH = 1445412480.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-1", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("", None),
        (_DATE, 30.0),  # now is 30 s before the date
        ("Wed, 21 Oct 2015 07:28:00", 30.0),  # no zone: HTTP-dates are GMT
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 30.0),  # RFC 850, still to be accepted
        ("Wed Oct 21 07:28:00 2015", 30.0),  # asctime, likewise
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert wire.parse_retry_after(value, _DATE_EPOCH - 30.0) == seconds


def test_parse_retry_after_date_in_the_past_is_no_wait() -> None:
    assert wire.parse_retry_after(_DATE, _DATE_EPOCH + 3600.0) == 0.0


def test_a_request_may_be_given_a_longer_timeout(recorder: str) -> None:
    # The limiter stretches the timeout while the server is slow; the next request that is
    # given none gets the configured one again, on the same kept-alive connection.
    client = wire.Wire(get_default_host_creds(recorder), 0.2)
    _Recorder.delay = 0.6
    with pytest.raises(TimeoutError):
        client.post_full("/x", b"{}")
    assert client.post_full("/x", b"{}", timeout=10.0)[0] == 200
    with pytest.raises(TimeoutError):
        client.post_full("/x", b"{}")
