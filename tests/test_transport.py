"""How the server's answers are sorted: ``check_answer`` (HTTP) and ``sort_mlflow_error``
(MLflow's own client and stores), the one place where an answer is judged."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from asynctrack._engine.transport import (
    Held,
    Refused,
    RestTransport,
    Transient,
    check_answer,
    sort_mlflow_error,
)


def error(code: str, message: str) -> str:
    return json.dumps({"error_code": code, "message": message})


def refusal(status: int, text: str) -> Refused:
    with pytest.raises(Refused) as caught:
        check_answer(status, text)
    return caught.value


# ---------------------------------------------------------------------------- check_answer


def test_200_is_an_answer() -> None:
    check_answer(200, "{}")


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_away_or_busy_statuses_are_transient(status: int) -> None:
    with pytest.raises(Transient, match=f"^HTTP {status}$"):
        check_answer(status, "<html>Bad Gateway</html>")


@pytest.mark.parametrize(
    "message",
    [
        "QueuePool limit of size 5 overflow 10 reached, connection timed out",
        "(sqlite3.OperationalError) database is locked",
    ],
)
def test_an_overloaded_store_behind_a_400_is_transient(message: str) -> None:
    with pytest.raises(Transient, match=r"^HTTP 400: "):
        check_answer(400, error("INVALID_PARAMETER_VALUE", message))


def test_an_invalid_value_is_refused_and_splittable() -> None:
    refused = refusal(400, error("INVALID_PARAMETER_VALUE", "Invalid value NaN for step"))
    assert refused.reason == "INVALID_PARAMETER_VALUE: Invalid value NaN for step"
    assert refused.splittable


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (404, "RESOURCE_DOES_NOT_EXIST", "Run 'abc' not found"),  # about the request
        (400, "INVALID_STATE", "run is not active"),
        (400, "INVALID_PARAMETER_VALUE", "The run abc must be in the 'active' state."),
    ],
)
def test_a_refusal_of_the_whole_request_is_not_splittable(
    status: int, code: str, message: str
) -> None:
    assert not refusal(status, error(code, message)).splittable


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (403, "PERMISSION_DENIED", "Permission denied"),
        (401, "UNAUTHENTICATED", "You are not authenticated"),
        (403, "", "forbidden by a proxy"),
        (407, "", "Proxy Authentication Required"),
    ],
)
def test_refused_credentials_or_permissions_are_held_not_refused(
    status: int, code: str, message: str
) -> None:
    """Who asks, not what: the user can fix it, so the events are kept (never final)."""
    with pytest.raises(Held, match=f"HTTP {status}: {message}"):
        check_answer(status, error(code, message) if code else message)


def test_mlflow_errors_about_credentials_are_held() -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

    for code in (UNAUTHENTICATED, PERMISSION_DENIED):
        assert isinstance(sort_mlflow_error(MlflowException("no", error_code=code)), Held)


def test_a_body_that_is_not_an_mlflow_error_is_named_by_its_status() -> None:
    assert refusal(400, "Bad Request").reason == "HTTP 400: Bad Request"
    assert refusal(413, "[1, 2]").reason == "HTTP 413: [1, 2]"


def test_a_long_message_is_cut_and_credentials_are_hidden() -> None:
    message = "see https://alice:s3cret@mlflow.example.com/x " + "y" * 1000
    reason = refusal(400, error("BAD_REQUEST", message)).reason
    assert "s3cret" not in reason and "https://***@mlflow.example.com/x" in reason
    assert reason.endswith("...") and len(reason) < 350


# ---------------------------------------------------------------------------- sort_mlflow_error


@pytest.mark.parametrize(
    "code",
    [
        databricks_pb2.TEMPORARILY_UNAVAILABLE,
        databricks_pb2.INTERNAL_ERROR,
        databricks_pb2.REQUEST_LIMIT_EXCEEDED,
    ],
)
def test_mlflow_busy_codes_are_transient(code: int) -> None:
    sorted_error = sort_mlflow_error(MlflowException("try later", error_code=code))
    assert isinstance(sorted_error, Transient) and str(sorted_error) == "try later"


def test_a_locked_sqlite_store_is_transient() -> None:
    exc = MlflowException("(sqlite3.OperationalError) database is locked")
    assert isinstance(sort_mlflow_error(exc), Transient)


def test_mlflow_refusals_keep_their_code_and_splittability() -> None:
    invalid = sort_mlflow_error(
        MlflowException("bad step", error_code=databricks_pb2.INVALID_PARAMETER_VALUE)
    )
    missing = sort_mlflow_error(
        MlflowException("no run", error_code=databricks_pb2.RESOURCE_DOES_NOT_EXIST)
    )
    assert isinstance(invalid, Refused) and invalid.splittable
    assert invalid.reason == "INVALID_PARAMETER_VALUE: bad step"
    assert isinstance(missing, Refused) and not missing.splittable


def test_connection_errors_are_transient() -> None:
    sorted_error = sort_mlflow_error(ConnectionRefusedError(111, "Connection refused"))
    assert isinstance(sorted_error, Transient)
    assert str(sorted_error) == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_any_other_error_is_refused_whole() -> None:
    sorted_error = sort_mlflow_error(KeyError("AWS_SECRET_ACCESS_KEY"))
    assert isinstance(sorted_error, Refused) and not sorted_error.splittable
    assert sorted_error.reason == "KeyError: 'AWS_SECRET_ACCESS_KEY'"


# ---------------------------------------------------------------------------- Retry-After


class _SlowDown(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = error("REQUEST_LIMIT_EXCEEDED", "slow down").encode()
        self.send_response(429)
        self.send_header("Retry-After", "7")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    """A server that answers every request with 429 and ``Retry-After: 7``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    thread = threading.Thread(target=server.serve_forever, name="slow-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_servers_retry_after_reaches_the_retry_policy(slow_server: str) -> None:
    transport = RestTransport(slow_server, request_timeout=10.0)
    with pytest.raises(Transient) as caught:
        transport.log_batch("r", [("r", "loss", 1.0, 1.5, 0)], (), ())
    assert caught.value.retry_after == 7.0
