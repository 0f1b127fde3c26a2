"""Shared fixtures: a real MLflow server for the session (from asynctrack.testing), a fresh
experiment per test, and a client to read back what the server holds."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import mlflow
import pytest

import asynctrack
from asynctrack import MLflowExperimentTracker

if TYPE_CHECKING:
    from asynctrack.testing import MlflowServer

pytest_plugins = ["asynctrack.testing"]


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
