"""Tests for asynctrack.testing: the servers it starts must be real and restartable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from asynctrack.testing import S3Server

# Loads the fixtures the way users do (a no-op if a conftest already did). Importing
# asynctrack.testing at the top would stop pytest from assert-rewriting it as a plugin,
# so the tests import from it inside their bodies.
pytest_plugins = ["asynctrack.pytest_plugin"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(300)
def test_mlflow_server_logs_survive_restart(tmp_path: Path) -> None:
    import mlflow

    from asynctrack.testing import MlflowServer

    server = MlflowServer(tmp_path)
    started = time.monotonic()
    with server:
        print(f"mlflow server start: {time.monotonic() - started:.1f} s")
        assert server.url == f"http://127.0.0.1:{server.port}"
        first_pid = server.pid
        assert first_pid is not None and _pid_alive(first_pid)

        client = mlflow.MlflowClient(tracking_uri=server.url)
        exp_id = client.create_experiment("testing-servers")
        run = client.create_run(exp_id)
        run_id = run.info.run_id
        # Artifacts are proxied by default, so the client never learns the local path.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        client.log_text(run_id, "hello", "notes/a.txt")
        assert (tmp_path / "artifacts" / exp_id / run_id / "artifacts/notes/a.txt").exists()
        client.log_metric(run_id, "loss", 0.25, step=3)
        assert client.get_run(run_id).data.metrics == {"loss": 0.25}

        port = server.port
        started = time.monotonic()
        server.restart()
        print(f"mlflow server restart: {time.monotonic() - started:.1f} s")
        assert server.port == port
        assert server.pid is not None and server.pid != first_pid
        assert not _pid_alive(first_pid)

        history = client.get_metric_history(run_id, "loss")
        assert [(m.value, m.step) for m in history] == [(0.25, 3)]
        last_pid = server.pid

    assert server.pid is None
    assert not _pid_alive(last_pid)
    assert not _group_alive(last_pid)
    server.stop()  # idempotent
    assert (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(60)
def test_mlflow_server_start_failure_reports_log(tmp_path: Path) -> None:
    from asynctrack.testing import MlflowServer

    server = MlflowServer(tmp_path, artifact_args=["--no-such-option"], startup_timeout=30)
    with pytest.raises(RuntimeError, match="no-such-option"):
        server.start()
    assert server.pid is None


def test_free_port_is_bindable() -> None:
    import socket

    from asynctrack.testing import free_port

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.timeout(60)
def test_s3_server_put_get() -> None:
    pytest.importorskip("moto")
    import boto3  # type: ignore[import-untyped, unused-ignore]

    from asynctrack.testing import S3Server

    with S3Server() as s3:
        assert s3.endpoint_url.startswith("http://127.0.0.1:")
        env = s3.env()
        assert env["MLFLOW_S3_ENDPOINT_URL"] == s3.endpoint_url
        assert set(env) == {
            "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        }
        s3.create_bucket("asynctrack-test")
        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        client.put_object(Bucket="asynctrack-test", Key="a/b.txt", Body=b"hello")
        body = client.get_object(Bucket="asynctrack-test", Key="a/b.txt")["Body"].read()
        assert body == b"hello"
    with pytest.raises(RuntimeError):
        _ = s3.endpoint_url


@pytest.mark.timeout(180)
def test_fixtures(mlflow_tracking_uri: str, s3_server: S3Server) -> None:
    import mlflow

    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_tracking_uri
    # The fluent API picks the server up from the environment variable.
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.0)
    client = mlflow.MlflowClient(tracking_uri=mlflow_tracking_uri)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}

    s3_server.create_bucket("fixture-bucket")
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert "fixture-bucket" in names


@pytest.mark.timeout(300)
def test_mlflow_server_on_postgres(tmp_path: Path) -> None:
    import mlflow

    from asynctrack.testing import MlflowPostgresServer

    server = MlflowPostgresServer(tmp_path, workers=2)
    started = time.monotonic()
    with server:
        print(f"postgres + mlflow server start: {time.monotonic() - started:.1f} s")
        assert "postgresql+psycopg2://" in " ".join(server._command())
        pg_pid = server.postgres.pid
        assert pg_pid is not None and _pid_alive(pg_pid)
        data = Path(server.postgres.log_path).parent

        client = mlflow.MlflowClient(tracking_uri=server.url)
        run_id = client.create_run(client.create_experiment("on-postgres")).info.run_id
        client.log_batch(
            run_id,
            metrics=[mlflow.entities.Metric("loss", 1.0 / (i + 1), 0, i) for i in range(50)],
            params=[mlflow.entities.Param("lr", "0.1")],
        )
        client.set_terminated(run_id)

        server.restart()  # MLflow only: the database keeps what it stored
        assert server.postgres.pid == pg_pid
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.1"}
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(50))

    assert server.pid is None and server.postgres.pid is None
    assert not _group_alive(pg_pid)
    assert not data.exists()


@pytest.mark.timeout(120)
def test_postgres_server_moves_off_a_taken_port() -> None:
    import socket

    import psycopg2  # type: ignore[import-untyped, unused-ignore]

    from asynctrack.testing import PostgresServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = PostgresServer()
        server._port = taken.getsockname()[1]  # as if someone took it after free_port()
        with server:
            assert server.port != taken.getsockname()[1]
            assert server.uri.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
            conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres")
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT current_user, current_database()")
                    assert cursor.fetchone() == ("postgres", "postgres")
            finally:
                conn.close()
        assert server.pid is None


def test_asynctrack_testing_imports_without_pytest() -> None:
    """The servers are for any test runner: only the fixtures need pytest."""
    code = (
        "import sys; sys.modules['pytest'] = None\n"  # makes `import pytest` fail
        "import asynctrack.testing as t\n"
        "assert t.MlflowServer and t.S3Server and not hasattr(t, 'mlflow_server')\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
