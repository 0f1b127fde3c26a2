"""Real servers on 127.0.0.1 for tests: an MLflow tracking server and an S3 endpoint.

Use the classes directly::

    from asynctrack.testing import MlflowServer, S3Server

    with S3Server() as s3:
        s3.create_bucket("artifacts")
        args = ["--serve-artifacts", "--artifacts-destination", "s3://artifacts"]
        with MlflowServer(tmp_path, artifact_args=args, env=s3.env()) as server:
            client = mlflow.MlflowClient(tracking_uri=server.url)

or as a pytest plugin, by adding ``pytest_plugins = ["asynctrack.testing"]`` to a
``conftest.py``. That provides the session-scoped fixtures ``mlflow_server`` and
``s3_server`` and the function-scoped ``mlflow_tracking_uri``, which also points
``MLFLOW_TRACKING_URI`` at the server for the duration of one test.

The MLflow server runs as a subprocess (``sys.executable -m mlflow server``) with a
SQLite store; the S3 endpoint is moto's S3 server in a thread of the test process.
A server dies with the process that started it, however that ends: ``stop()`` at exit
(``atexit``), and a guard process that stops the server's process group as soon as the
starting process is gone (even after SIGKILL), so an interrupted test run leaves no
server behind.
moto and boto3 are imported only when an ``S3Server`` is used, so the MLflow side
works without them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

    # typing.Self needs 3.11 and the package supports 3.10; annotations are never evaluated.
    from typing_extensions import Self

__all__ = [
    "MlflowServer",
    "S3Server",
    "free_port",
    "mlflow_server",
    "mlflow_tracking_uri",
    "s3_server",
]

_HOST = "127.0.0.1"
# moto accepts any credentials; these are placeholders, not secrets.
_S3_KEY = "testing"
_S3_REGION = "us-east-1"
_LOG_TAIL_CHARS = 4000
# Calls to 127.0.0.1 must not go through an HTTP(S)_PROXY from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# The server's process-group leader: it starts the server and exits with its code,
# ignoring the SIGTERM that stop() sends the group so that it waits for the server's own
# graceful exit. Its stdin is the read end of a pipe whose write end only the test process
# holds, so the read returns once that process is gone, however it died (SIGKILL
# included); the guard then stops the group. A pipe rather than prctl(PR_SET_PDEATHSIG):
# that signal follows the *thread* that forked, and servers are started from short-lived
# threads.
_GUARD = """
import os, signal, subprocess, sys, threading
proc = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
def reap():
    code = proc.wait()
    os._exit(code if code >= 0 else 128 - code)
threading.Thread(target=reap, daemon=True).start()
while os.read(0, 1):
    pass
os.killpg(0, signal.SIGTERM)
try:
    proc.wait(10)
finally:
    os.killpg(0, signal.SIGKILL)
"""
# Servers still running at interpreter exit are stopped then, beside the guard.
_RUNNING: weakref.WeakSet[MlflowServer] = weakref.WeakSet()


@atexit.register
def _stop_running() -> None:
    for server in list(_RUNNING):
        server.stop(grace=5.0)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS may reuse it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class MlflowServer:
    """An ``mlflow server`` subprocess with a SQLite store under ``workdir``.

    With no ``artifact_args`` the server proxies artifacts to ``workdir/artifacts``.
    ``env`` adds environment variables for the server only (e.g. ``S3Server.env()``).
    """

    def __init__(
        self,
        workdir: Path,
        artifact_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        startup_timeout: float = 120.0,
        workers: int = 1,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "mlflow-server.log"
        self.startup_timeout = startup_timeout
        # One worker starts fastest; benchmarks ask for MLflow's default of 4.
        self.workers = workers
        self._artifact_args = list(artifact_args) or [
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.workdir / "artifacts"),
        ]
        self._extra_env = dict(env or {})
        # Once started, the URL is out in clients, so later starts must keep the port.
        self._port_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None  # the write end of the guard's pipe

    def __repr__(self) -> str:
        # Deliberately leaves out the env: it may hold credentials.
        return f"MlflowServer(url={self.url!r}, pid={self.pid}, workdir={str(self.workdir)!r})"

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        """PID of the server's process-group leader (the guard that started ``mlflow
        server``), or None when stopped."""
        return self._proc.pid if self._proc is not None else None

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", _HOST,
            "--port", str(self._port),
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--workers", str(self.workers),
            *self._artifact_args,
        ]  # fmt: skip

    def _log_tail(self, since: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return "<no server log>"
        return text[-_LOG_TAIL_CHARS:]

    def _healthy(self) -> bool:
        try:
            with _NO_PROXY_OPENER.open(f"{self.url}/health", timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        """Start the server and wait until ``/health`` answers 200; no-op if running."""
        if self._proc is not None and self._proc.poll() is None:
            return
        attempts = 3
        for attempt in range(1, attempts + 1):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            error = self._start_once(log_start)
            if error is None:
                self._port_fixed = True
                return
            tail = self._log_tail(log_start)
            # The port can be taken between free_port() and uvicorn binding it, or still be
            # held by the previous server right after a restart; only that is worth retrying.
            if "address already in use" in tail.lower() and attempt < attempts:
                if not self._port_fixed:
                    self._port = free_port()
                time.sleep(0.5 * attempt)
                continue
            raise RuntimeError(f"{error}; last lines of {self.log_path}:\n{tail}")

    def _start_once(self, log_start: int) -> str | None:
        env = {
            **os.environ,
            **self._extra_env,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        lifeline, self._lifeline = os.pipe()
        try:
            with self.log_path.open("ab") as log:
                # Its own session, so stop() can signal the guard, the CLI and the uvicorn
                # workers it spawns at once.
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _GUARD, *self._command()],
                    cwd=self.workdir,
                    env=env,
                    stdin=lifeline,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        finally:
            os.close(lifeline)
        _RUNNING.add(self)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                return f"mlflow server on port {self._port} exited with code {code} during start-up"
            if self._healthy():
                return None
            time.sleep(0.1)
        self.stop()
        return f"mlflow server on port {self._port} not healthy after {self.startup_timeout:.0f} s"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` s; safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        # Also reaches workers that outlived the CLI, whether or not it exited in time.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        _RUNNING.discard(self)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same store."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class S3Server:
    """moto's S3 server in a thread of this process, on a free port of 127.0.0.1.

    moto keeps its buckets in process-global state: every S3Server (and any ``mock_aws``)
    in one process shares them, and they survive ``stop()``.
    """

    def __init__(self) -> None:
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("S3Server is not started")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def start(self) -> None:
        if self._server is not None:
            return
        from moto.server import ThreadedMotoServer

        # verbose=False: otherwise moto prints a line to stdout on every start.
        server = ThreadedMotoServer(ip_address=_HOST, port=0, verbose=False)
        server.start()
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and MLflow) at this endpoint."""
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": _S3_KEY,
            "AWS_SECRET_ACCESS_KEY": _S3_KEY,
            "AWS_DEFAULT_REGION": _S3_REGION,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        # unused-ignore: keeps mypy quiet whether or not boto3 stubs are installed.
        import boto3  # type: ignore[import-untyped, unused-ignore]

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=_S3_KEY,
            aws_secret_access_key=_S3_KEY,
            region_name=_S3_REGION,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A started MLflow server with local proxied artifacts, shared by the session."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A started moto S3 endpoint, shared by the session."""
    with S3Server() as server:
        yield server


@pytest.fixture
def mlflow_tracking_uri(
    mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The session server's URL, also set as ``MLFLOW_TRACKING_URI`` for this test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    yield mlflow_server.url
