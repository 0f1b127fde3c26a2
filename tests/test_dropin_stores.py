"""The drop-in on every kind of tracking URI plain MLflow accepts: a local sqlite file, a
``file:`` store, a PostgreSQL database and an HTTP server. The same script runs plain and
patched into one store; the stored runs are compared field by field
(``differential.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from differential import assert_same, both, workload

import asynctrack
from asynctrack._engine.runtime import configure_engine
from asynctrack.testing import MlflowPostgresServer, MlflowServer

STORES = ["sqlite", "file", "postgresql", "http"]


@pytest.fixture(params=STORES)
def store_uri(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A tracking URI of each kind, set for the test as MLflow's own."""
    kind = request.param
    if kind == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    elif kind == "file":
        uri = (tmp_path / "mlruns").as_uri()
        # MLflow 3.18 refuses the file store unless told it is wanted (maintenance mode).
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    elif kind == "postgresql":
        server: MlflowPostgresServer = request.getfixturevalue("mlflow_server_pg")
        uri = server.postgres.uri  # the database itself, as a client of the store
    else:
        http: MlflowServer = request.getfixturevalue("mlflow_server")
        uri = http.url
    # A flush that waits on itself must fail the test in seconds, not at 60 s (a shared
    # server's engine may be running already: it keeps its settings).
    with contextlib.suppress(RuntimeError):
        configure_engine(uri, flush_timeout=20.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_same_script_stores_the_same_runs(
    store_uri: str, experiment_name: str, tmp_path: Path
) -> None:
    plain, patched = both(workload(tmp_path / "files"), experiment_name, tmp_path)
    assert {r["name"] for r in plain} == {"parent", "child", "failed", "client-run"}
    assert plain[3]["artifacts"]  # parent: artifacts were compared, not two empty sets
    assert_same(plain, patched)


def test_a_patched_run_is_stored_on_every_store(store_uri: str, experiment_name: str) -> None:
    """The engine's store path never calls the patched client (it used to queue its own
    batches again and wait on itself: FlushTimeoutError at the run's end, nothing stored)."""
    mlflow.set_experiment(experiment_name)
    with asynctrack.patch_mlflow(quiet=True):
        with mlflow.start_run() as run:
            for step in range(100):
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            mlflow.log_param("p", 1)
            mlflow.set_tag("t", "v")
        stats = asynctrack.stats()
    stored = mlflow.MlflowClient().get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"p": "1"} and stored.data.tags["t"] == "v"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(100))
    assert stats.sent >= 102
