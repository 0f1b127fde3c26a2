"""Shared fixtures: a real MLflow server for the session (from asynctrack.testing), a fresh
experiment per test, and a client to read back what the server holds."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import mlflow
import pytest

import asynctrack
from asynctrack import MLflowExperimentTracker

if TYPE_CHECKING:
    from asynctrack.testing import MlflowServer

pytest_plugins = ["asynctrack.pytest_plugin"]


# Tests that take tens of seconds each (a demo, crashes and restarts, docker compose, large
# uploads): `pytest -m "not slow"` leaves them out. Marked here by file or by test, so the
# files themselves need not change; a test can also carry @pytest.mark.slow itself.
# Measured with --durations on a loaded 2-core machine: the artifact files start two more
# MLflow servers and an IAM-checking S3 server (about a minute before their first test).
SLOW_FILES = {
    "test_artifacts.py",
    "test_auth.py",
    "test_artifacts_outage.py",
    "test_compose.py",
    "test_demo.py",
    "test_faults_crash.py",
    "test_faults_server.py",
    "test_lifecycle.py",
    "test_models.py",
    "test_testing_cleanup.py",
}
SLOW_TESTS = {
    "test_async.py::test_heartbeat_keeps_ticking_while_a_large_flush_is_awaited",
    "test_cli.py::test_as_a_subprocess",
    "test_delivery.py::test_flush_timeout_with_server_down_then_everything_arrives",
    "test_examples.py::test_full_pipeline",
    "test_examples.py::test_grid_search",
    "test_testing_servers.py::test_mlflow_server_logs_survive_restart",
    "test_tracker.py::test_100k_log_metric_calls_all_stored_in_order",
    "test_tracker.py::test_eight_plain_threads_log_to_one_run",
    "test_tracker.py::test_eight_threads_log_to_one_run_with_copied_context",
}


def pytest_configure(config: pytest.Config) -> None:
    # Every engine the tests start spools into this session's directory, never the user's
    # (an ASYNCTRACK_SPOOL_DIR in the environment is overridden, not kept).
    os.environ["ASYNCTRACK_SPOOL_DIR"] = tempfile.mkdtemp(prefix="asynctrack-spool-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.name.split("[")[0]
        if item.path.name in SLOW_FILES or f"{item.path.name}::{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


class Data(NamedTuple):
    """scikit-learn's diabetes set, split as the seed's examples use X/y train and test."""

    X_train: Any
    X_test: Any
    y_train: Any
    y_test: Any


@pytest.fixture(scope="session")
def data() -> Data:
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
    return Data(X_train, X_test, y_train, y_test)


@pytest.fixture
def experiment_name(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(mlflow_server: MlflowServer, mlflow_tracking_uri: str) -> mlflow.MlflowClient:
    """Reads back from the server; also points MLFLOW_TRACKING_URI at it for the test."""
    return mlflow.MlflowClient(tracking_uri=mlflow_server.url)


@pytest.fixture
def tracker(client: mlflow.MlflowClient, experiment_name: str) -> MLflowExperimentTracker:
    return MLflowExperimentTracker(experiment_name=experiment_name)


@pytest.fixture(autouse=True)
def _settle_engines() -> Iterator[None]:
    """Each test starts with nothing queued and no refusals left over from another test."""
    yield
    for engine in asynctrack._engine.all_engines():
        with contextlib.suppress(asynctrack.AsyncTrackError):
            engine.flush(30)


@pytest.fixture
def restore_tracking_uri() -> Iterator[None]:
    """``asynctrack --tracking-uri`` (or MLFLOW_TRACKING_URI) sets MLflow's process-wide
    URI; put it back so later tests resolve theirs as before."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    yield
    utils._tracking_uri = before
