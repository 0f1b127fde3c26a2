"""``asynctrack.patch_mlflow()``: MLflow's own API through the engine, checked against
MLflow itself on one real server.

Each differential test runs one workload twice, through plain MLflow and under the
patch, into two experiments, then reads both back through plain ``MlflowClient`` and
compares the stored runs field by field.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from differential import T0, assert_same, both, experiment
from faults import wait_until
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.async_logging.run_operations import RunOperations

import asynctrack
from asynctrack._mlflow import client as patched_client
from asynctrack._mlflow import fluent as patched_fluent
from asynctrack._mlflow import private


@pytest.fixture
def patched() -> Iterator[None]:
    with asynctrack.patch_mlflow(quiet=True):
        yield
    asynctrack.flush()


# ---------------------------------------------------------------------- bad input

_log_metric: Any = mlflow.log_metric  # bad input on purpose: not what the stubs allow

_BAD_CALLS: list[tuple[str, Callable[[], Any]]] = [
    ("invalid key", lambda: _log_metric("bad key!", 1.0)),
    ("string value", lambda: _log_metric("k", "abc")),
    ("None value", lambda: _log_metric("k", None)),
    ("long key", lambda: _log_metric("k" * 251, 1.0)),
    ("changed param", lambda: mlflow.log_param("p", "other")),
    ("duplicate batch params", lambda: _duplicate_params()),
    ("invalid tag key", lambda: mlflow.set_tag("../up", "v")),
    ("huge int", lambda: _log_metric("k", 10**400)),
    ("step beyond int64", lambda: _log_metric("k", 1.0, step=2**63)),
    ("numeric string", lambda: _log_metric("numeric_string", "1.5", timestamp=T0)),
    ("bool", lambda: _log_metric("bool", True, timestamp=T0)),
    ("two-element array", lambda: _log_metric("k", np.array([1.0, 2.0]))),
]


def _duplicate_params() -> None:
    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
    mlflow.log_params({"q": 1})
    mlflow.MlflowClient().log_batch(run_id, params=[Param("d", "1"), Param("d", "2")])


def _bad_input_outcomes() -> dict[str, BaseException | None]:
    outcomes: dict[str, BaseException | None] = {}
    with mlflow.start_run(run_name="bad-input"):
        mlflow.log_param("p", "first")
        for i, (label, call) in enumerate(_BAD_CALLS):
            mlflow.log_metric("good", float(i), step=i, timestamp=T0 + i)
            try:
                call()
            except Exception as exc:
                outcomes[label] = exc
            else:
                outcomes[label] = None
        mlflow.log_metric("good", 99.0, step=99, timestamp=T0 + 99)
    return outcomes


def test_bad_input_raises_what_mlflow_raises_and_loses_nothing_else(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    experiment(experiment_name)
    plain = _bad_input_outcomes()
    plain_run = mlflow.last_active_run()
    with asynctrack.patch_mlflow(quiet=True):
        patched = _bad_input_outcomes()
        patched_run = mlflow.last_active_run()
    for label, expected in plain.items():
        got = patched[label]
        if expected is None:
            assert got is None, f"{label}: MLflow accepts it, the patch raised {got!r}"
        elif isinstance(expected, MlflowException):  # the server's refusal, or MLflow's check
            assert isinstance(got, MlflowException), f"{label}: {got!r} instead of {expected!r}"
            assert got.error_code == expected.error_code, label
            words = expected.message.removeprefix(f"{expected.error_code}: ")[:30]
            assert got.message.startswith(words), f"{label}: {got.message!r} is not {words!r}..."
        else:  # a conversion error raised at the call (TypeError, OverflowError...)
            assert isinstance(got, type(expected)), f"{label}: {got!r} instead of {expected!r}"
    assert plain_run is not None and patched_run is not None
    for run in (plain_run, patched_run):
        history = client.get_metric_history(run.info.run_id, "good")
        assert sorted(m.step for m in history) == [*range(len(_BAD_CALLS)), 99]
    assert patched_run.data.params == plain_run.data.params
    for key in ("numeric_string", "bool"):
        assert patched_run.data.metrics[key] == plain_run.data.metrics[key]


def _parity_outcomes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What MLflow does at the edges the drop-in used to get wrong."""
    out: dict[str, Any] = {}
    with mlflow.start_run() as run:
        operation = mlflow.log_metric("k", "apple", synchronous=False)  # type: ignore[arg-type]
        assert operation is not None
        out["async bad value, at the call"] = type(operation).__name__
        with pytest.raises(MlflowException) as at_wait:
            operation.wait()
        out["async bad value, at wait"] = type(at_wait.value).__name__
        mlflow.log_text("x", "dir/../normalised.txt")
        with monkeypatch.context() as m:
            m.setattr(time, "time", lambda: 1_700_000_123)  # a clock that returns an int
            mlflow.log_metric("int_clock", 1.0)
        mlflow.log_metric("zero_time", 2.0, timestamp=0)
    client = mlflow.MlflowClient()
    out["artifacts"] = [f.path for f in client.list_artifacts(run.info.run_id)]
    history = client.get_metric_history(run.info.run_id, "int_clock")
    out["int clock"] = [m.timestamp for m in history]
    out["zero time"] = [
        m.timestamp for m in client.get_metric_history(run.info.run_id, "zero_time")
    ]
    # A test suite's stand-in for the active-run stack: end_run must ask it, not go around.
    with mlflow.start_run() as outer, monkeypatch.context() as m:
        stack = [mlflow.tracking.fluent.ActiveRun(outer)]
        m.setattr(mlflow.tracking.fluent._active_run_stack, "get", lambda: stack)
        mlflow.end_run()
        out["wrapped stack"] = (len(stack), client.get_run(outer.info.run_id).info.status)
    return out


def test_edges_behave_as_mlflow_does(
    client: mlflow.MlflowClient,
    experiment_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    experiment(experiment_name)
    plain = _parity_outcomes(tmp_path, monkeypatch)
    with asynctrack.patch_mlflow(quiet=True):
        patched = _parity_outcomes(tmp_path, monkeypatch)
    assert plain["artifacts"] == ["normalised.txt"]
    assert plain["int clock"] == [1_700_000_123_000] and plain["zero time"] == [0]
    assert plain["wrapped stack"] == (0, "FINISHED")
    assert patched == plain


# ---------------------------------------------------------------------- MLflow's contract


def test_synchronous_true_returns_once_stored(
    client: mlflow.MlflowClient, experiment_name: str, patched: None
) -> None:
    experiment(experiment_name)
    unflushed_history = patched_client.ORIGINALS["get_metric_history"]
    with mlflow.start_run() as run:
        for i in range(50):
            mlflow.log_metric("queued", i, step=i)
        assert mlflow.log_metric("sync", 1.0, synchronous=True) is None
        assert len(unflushed_history(client, run.info.run_id, "sync")) == 1
        assert mlflow.log_param("sp", 5, synchronous=True) == 5
        client.log_batch(run.info.run_id, [Metric("b", 1.0, T0, 0)], synchronous=True)
        assert len(unflushed_history(client, run.info.run_id, "b")) == 1


def test_synchronous_false_returns_an_operation_to_wait_on(
    client: mlflow.MlflowClient, experiment_name: str, patched: None
) -> None:
    experiment(experiment_name)
    unflushed_history = patched_client.ORIGINALS["get_metric_history"]
    with mlflow.start_run() as run:
        operation = mlflow.log_metrics({f"k{i}": i for i in range(20)}, synchronous=False)
        assert isinstance(operation, RunOperations)
        operation.wait()
        assert len(unflushed_history(client, run.info.run_id, "k19")) == 1
        tagged = mlflow.set_tag("tag", "v", synchronous=False)
        assert tagged is not None
        tagged.wait()
        assert mlflow.log_param("p", 1) == 1  # the default mode returns what MLflow's does
        assert mlflow.log_metric("m", 1.0) is None


def test_enable_async_logging_is_read_at_the_call_as_mlflow_reads_it(
    client: mlflow.MlflowClient,
    experiment_name: str,
    patched: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    experiment(experiment_name)
    unflushed_history = patched_client.ORIGINALS["get_metric_history"]
    with mlflow.start_run() as run:
        assert mlflow.log_metric("m", 1.0, step=0) is None
        # switched on after the patch: the default mode now returns an operation
        monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
        operation = mlflow.log_metric("m", 2.0, step=1)
        assert isinstance(operation, RunOperations)
        batch = client.log_batch(run.info.run_id, [Metric("b", 1.0, T0, 0)])
        assert isinstance(batch, RunOperations)
        operation.wait()
        batch.wait()
        assert len(unflushed_history(client, run.info.run_id, "b")) == 1
        monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        assert mlflow.log_param("p", 1) == 1
        monkeypatch.delenv("MLFLOW_ENABLE_ASYNC_LOGGING")
        assert mlflow.log_metric("m", 3.0, step=2) is None
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "m")) == [0, 1, 2]


def test_synchronous_true_raises_mlflow_exception_for_a_server_refusal(
    client: mlflow.MlflowClient, experiment_name: str, patched: None
) -> None:
    run = client.create_run(experiment(experiment_name))
    client.delete_run(run.info.run_id)
    with pytest.raises(MlflowException):
        client.log_metric(run.info.run_id, "m", 1.0, synchronous=True)


def test_reads_see_this_process_writes(
    client: mlflow.MlflowClient, experiment_name: str, patched: None
) -> None:
    experiment_id = experiment(experiment_name)
    with mlflow.start_run() as run:
        for i in range(1000):
            mlflow.log_metric("m", float(i), step=i)
        mlflow.log_param("p", "v")
        mlflow.log_text("x", "x.txt")
        reader = mlflow.MlflowClient()
        assert len(reader.get_metric_history(run.info.run_id, "m")) == 1000
        assert mlflow.get_run(run.info.run_id).data.params == {"p": "v"}
        found = mlflow.search_runs([experiment_id], output_format="list")
        assert found[0].data.metrics["m"] == 999.0
        assert [f.path for f in reader.list_artifacts(run.info.run_id)] == ["x.txt"]
        mlflow.log_metric("last", 1.0)
    last = mlflow.last_active_run()
    assert last is not None and last.info.status == "FINISHED"
    assert last.data.metrics["last"] == 1.0


def test_flush_async_logging_is_our_flush(
    client: mlflow.MlflowClient, experiment_name: str, patched: None
) -> None:
    experiment(experiment_name)
    with mlflow.start_run() as run:
        for i in range(100):
            mlflow.log_metric("m", float(i), step=i)
        mlflow.flush_async_logging()
        assert asynctrack.stats().queued == 0
        history = patched_client.ORIGINALS["get_metric_history"](client, run.info.run_id, "m")
        assert len(history) == 100


def test_patch_is_idempotent_and_unpatch_restores_mlflow() -> None:
    original: Any = mlflow.log_metric
    with asynctrack.patch_mlflow(quiet=True):
        assert mlflow.log_metric is not original
        with asynctrack.patch_mlflow(quiet=True):  # already in place: leaves it on exit
            pass
        assert mlflow.log_metric is not original
        assert mlflow.tracking.fluent.end_run is not patched_fluent.ORIGINALS["end_run"]
    assert mlflow.log_metric is original
    assert mlflow.MlflowClient.log_batch is patched_client.ORIGINALS["log_batch"]
    asynctrack.unpatch_mlflow()  # twice: nothing to do


def test_unserved_tracking_uri_keeps_mlflow_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from asynctrack._mlflow import routing, sink

    assert not sink.serves("databricks")
    assert sink.serves("http://host:5000") and sink.serves(str(tmp_path))
    assert routing.sink_of("databricks://profile", "run") is None
    assert routing.sink_of("databricks://profile", "run2") is None
    assert capsys.readouterr().err.count("not one asynctrack serves") == 1


def test_private_mlflow_names_exist(client: mlflow.MlflowClient, experiment_name: str) -> None:
    for owner, name in private.NAMES:
        assert hasattr(owner, name), f"{owner.__name__}.{name} is gone: update private.py"
    experiment(experiment_name)
    assert private.active_entity() is None
    with mlflow.start_run() as run:
        assert private.active_entity().info.run_id == run.info.run_id
    private.watch_active_models()
    try:
        assert private.active_model_id() is None
        mlflow.set_active_model(name="watched")
        assert private.active_model_id() is not None
        mlflow.clear_active_model()
        assert private.active_model_id() is None
    finally:
        private.unwatch_active_models()


# ---------------------------------------------------------------------- integrations


def _grid_search(data: Any) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    mlflow.sklearn.autolog(log_datasets=False)
    try:
        search = GridSearchCV(Ridge(), {"alpha": [0.1, 1.0]}, cv=2)
        with mlflow.start_run(run_name="grid"):
            search.fit(data.X_train, data.y_train)
    finally:
        mlflow.sklearn.autolog(disable=True)


@pytest.mark.slow
def test_sklearn_autolog_grid_search_stores_the_same_runs(
    client: mlflow.MlflowClient, experiment_name: str, data: Any, tmp_path: Path
) -> None:
    plain, patched = both(lambda: _grid_search(data), experiment_name, tmp_path)
    assert len(plain) == 3  # the search and its two child runs
    for runs in (plain, patched):
        for run in runs:
            run["tags"] = {k: v for k, v in run["tags"].items() if k != "mlflow.runName"}
            run["name"] = "grid" if run["name"] == "grid" else "child"
            run["artifacts"] = sorted(run["artifacts"])  # cv_results' rows carry fit times
            for key, rows in run["metrics"].items():  # fit and score times vary run to run
                timing = key.endswith("_time")
                run["metrics"][key] = [(step, "<t>" if timing else v) for step, v, _ in rows]
    key = lambda r: (r["name"], sorted(r["params"].items()))  # noqa: E731
    assert_same(sorted(plain, key=key), sorted(patched, key=key))


def test_system_metrics_land_under_the_patch(
    client: mlflow.MlflowClient, experiment_name: str, patched: None
) -> None:
    experiment(experiment_name)
    mlflow.set_system_metrics_sampling_interval(0.1)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        with mlflow.start_run(log_system_metrics=True) as run:
            wait_until(
                lambda: any(
                    k.startswith("system/") for k in client.get_run(run.info.run_id).data.metrics
                ),
                what="a system metric stored",
            )
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
    stored = client.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in stored.data.metrics


def test_notice_once_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    from asynctrack._mlflow import patch

    told, patch._told = patch._told, False
    try:
        with asynctrack.patch_mlflow():
            pass
        with asynctrack.patch_mlflow():
            pass
    finally:
        patch._told = told
    assert capsys.readouterr().err.count("MLflow logging goes through asynctrack") == 1
