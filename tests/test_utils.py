"""The seed's utilities (``asynctrack.utils``) on runs made through asynctrack, against the
real test server: every answer is checked against what the server holds."""

from __future__ import annotations

import math
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import mlflow
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.model_selection import train_test_split

import asynctrack.utils
from asynctrack import (
    MLflowExperimentTracker,
    compare_runs,
    delete_experiment_runs,
    get_best_run,
    get_experiment_summary,
    get_run_by_name,
    list_registered_models,
    load_best_model,
    register_best_model,
    transition_model_stage,
)

# Explicit requirements: no 10 s requirement inference per logged model.
REQUIREMENTS = ["scikit-learn"]
RUN_KEYS = {"run_id", "run_name", "metrics", "params", "tags", "status"}


class Data(NamedTuple):
    X_train: pd.DataFrame
    X_test: pd.DataFrame
    y_train: pd.Series
    y_test: pd.Series


@pytest.fixture(scope="module")
def data() -> Data:
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
    return Data(X_train, X_test, y_train, y_test)


def log_run(
    tracker: MLflowExperimentTracker,
    name: str,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    with tracker.start_run(run_name=name):
        if tags:
            tracker.set_tags(tags)
        if params:
            tracker.log_params(params)
        if metrics:
            tracker.log_metrics(metrics)
    assert tracker.run_id is not None
    return tracker.run_id


def experiment_runs(client: MlflowClient, experiment_name: str, **kw: Any) -> list[Any]:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], max_results=1000, **kw))


def model_name(experiment_name: str) -> str:
    return f"{experiment_name}-model-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------- get_best_run


def test_get_best_run_highest_and_ascending(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    a = log_run(tracker, "a", {"r2_score": 0.5, "rmse": 3.0}, {"alpha": 1}, {"team": "x"})
    b = log_run(tracker, "b", {"r2_score": 0.8, "rmse": 2.0}, {"alpha": 2}, {"team": "y"})
    c = log_run(tracker, "c", {"r2_score": 0.7, "rmse": 1.0}, {"alpha": 3})
    log_run(tracker, "no-metric", {"loss": 0.1})  # lacks r2_score and rmse: never the best

    best = get_best_run(experiment_name)
    assert set(best) == RUN_KEYS
    assert best["run_id"] == b and best["run_name"] == "b"
    assert best["metrics"] == {"r2_score": 0.8, "rmse": 2.0}
    assert best["params"] == {"alpha": "2"}
    assert best["tags"] == {"team": "y"}  # MLflow's own mlflow.* tags left out
    assert best["status"] == "FINISHED"
    assert best["metrics"] == client.get_run(b).data.metrics

    assert get_best_run(experiment_name, metric="rmse", ascending=True)["run_id"] == c
    assert get_best_run(experiment_name, metric="rmse")["run_id"] == a
    assert get_best_run(experiment_name, metric="r2_score", ascending=True)["run_id"] == a


def test_get_best_run_tie_goes_to_most_recent_run(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    first = log_run(tracker, "first", {"r2_score": 0.9})
    second = log_run(tracker, "second", {"r2_score": 0.9})
    log_run(tracker, "worse", {"r2_score": 0.1})
    starts = {r: client.get_run(r).info.start_time for r in (first, second)}
    newest = max(starts, key=lambda r: starts[r])
    assert starts[first] != starts[second]
    assert get_best_run(experiment_name)["run_id"] == newest
    assert get_best_run(experiment_name)["run_id"] == newest  # stable from call to call


def test_get_best_run_skips_nan(tracker: MLflowExperimentTracker, experiment_name: str) -> None:
    log_run(tracker, "nan", {"r2_score": math.nan})
    good = log_run(tracker, "good", {"r2_score": 0.3})
    assert get_best_run(experiment_name)["run_id"] == good
    assert get_best_run(experiment_name, ascending=True)["run_id"] == good


def test_read_your_writes_without_flush(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    """Queries see what this process logged a moment ago, with no flush() in between."""
    with tracker.start_run(run_name="fresh"):
        for step in range(2000):  # keep the worker busy so the last events are still queued
            tracker.log_metric("loss", 1.0 / (step + 1), step=step)
        tracker.log_params({"lr": 0.01})
        tracker.log_metric("r2_score", 0.42)
        best = get_best_run(experiment_name)
        assert best["run_name"] == "fresh" and best["metrics"]["r2_score"] == 0.42
        assert best["status"] == "RUNNING"
        by_name = get_run_by_name(experiment_name, "fresh")
        assert by_name is not None and by_name["params"] == {"lr": "0.01"}
        table = compare_runs(experiment_name, ["r2_score", "loss"])
        assert table["metric_loss"].tolist() == [1.0 / 2000]
        history = client.get_metric_history(best["run_id"], "loss")
        assert len(history) == 2000


# ---------------------------------------------------------------- get_run_by_name


def test_get_run_by_name_hit_miss_and_most_recent(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    log_run(tracker, "baseline", {"r2_score": 0.1}, {"v": 1})
    newer = log_run(tracker, "baseline", {"r2_score": 0.2}, {"v": 2})
    odd = ["o'brien", 'say "hi"', """both ' and \"""", "back\\slash"]
    odd_ids = {n: log_run(tracker, n, {"r2_score": 0.3}) for n in odd}
    log_run(tracker, "baseline-v2", {"r2_score": 0.4})

    run = get_run_by_name(experiment_name, "baseline")
    assert run is not None and set(run) == RUN_KEYS
    assert run["run_id"] == newer and run["params"] == {"v": "2"}
    assert run["metrics"] == client.get_run(newer).data.metrics
    for odd_name, run_id in odd_ids.items():
        found = get_run_by_name(experiment_name, odd_name)
        assert found is not None and found["run_id"] == run_id, odd_name
    assert get_run_by_name(experiment_name, "no-such-run") is None
    assert get_run_by_name(experiment_name, "baseline-v") is None  # exact names only


# ---------------------------------------------------------------- compare_runs


def test_compare_runs_columns_sorting_and_top_n(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    ids = {
        "low": log_run(tracker, "low", {"r2_score": 0.2, "rmse": 9.0}, {"depth": 3}),
        "high": log_run(tracker, "high", {"r2_score": 0.9, "rmse": 1.0}, {"depth": 9, "lr": 0.1}),
        "mid": log_run(tracker, "mid", {"r2_score": 0.5, "rmse": 4.0, "mae": 2.0}),
        "none": log_run(tracker, "none", {"rmse": 7.0}),
    }
    table = compare_runs(experiment_name)
    assert list(table.columns) == [
        "run_id",
        "run_name",
        "status",
        "start_time",
        "metric_mae",
        "metric_r2_score",
        "metric_rmse",
        "param_depth",
        "param_lr",
    ]
    # sorted by r2_score, highest first; the run without it last
    assert table["run_name"].tolist() == ["high", "mid", "low", "none"]
    assert table["run_id"].tolist() == [ids[n] for n in ("high", "mid", "low", "none")]
    assert table["metric_r2_score"].tolist()[:3] == [0.9, 0.5, 0.2]
    assert math.isnan(table["metric_r2_score"].iloc[3])
    assert [None if pd.isna(v) else v for v in table["param_depth"]] == ["9", None, "3", None]
    assert [None if pd.isna(v) else v for v in table["param_lr"]] == ["0.1", None, None, None]
    assert set(table["status"]) == {"FINISHED"}
    server = client.get_run(ids["high"]).info.start_time
    assert table["start_time"].iloc[0] == pd.Timestamp(server, unit="ms", tz="UTC")

    top2 = compare_runs(experiment_name, top_n=2)
    assert top2["run_name"].tolist() == ["high", "mid"]

    only = compare_runs(experiment_name, metrics=["rmse", "r2_score"], top_n=3)
    assert [c for c in only.columns if c.startswith("metric_")] == [
        "metric_rmse",
        "metric_r2_score",
    ]
    assert only["run_name"].tolist() == ["low", "none", "mid"]  # by rmse, the first metric
    assert only["metric_rmse"].tolist() == [9.0, 7.0, 4.0]


def test_compare_runs_empty_experiment(client: MlflowClient, experiment_name: str) -> None:
    client.create_experiment(experiment_name)
    table = compare_runs(experiment_name)
    assert table.empty
    assert list(table.columns[:4]) == ["run_id", "run_name", "status", "start_time"]


# ---------------------------------------------------------------- get_experiment_summary


def test_get_experiment_summary(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    log_run(tracker, "a", {"r2_score": 0.6, "rmse": 3.0, "mae": 1.0})
    log_run(tracker, "b", {"r2_score": 0.8, "rmse": 2.5})
    with pytest.raises(RuntimeError), tracker.start_run(run_name="broken"):
        tracker.log_metric("r2_score", 0.1)
        raise RuntimeError("training blew up")
    assert client.get_run(tracker.run_id).info.status == "FAILED"

    summary = get_experiment_summary(experiment_name)
    assert summary["total_runs"] == 3
    assert summary["finished_runs"] == 2
    assert summary["failed_runs"] == 1
    assert summary["best_r2"] == 0.8
    assert summary["best_rmse"] == 2.5
    assert summary["avg_r2"] == pytest.approx((0.6 + 0.8 + 0.1) / 3)
    per_metric = summary["metrics"]
    assert set(per_metric) == {"r2_score", "rmse", "mae"}
    assert per_metric["r2_score"] == {
        "count": 3,
        "min": 0.1,
        "max": 0.8,
        "mean": pytest.approx(0.5),
    }
    assert per_metric["rmse"] == {"count": 2, "min": 2.5, "max": 3.0, "mean": 2.75}
    assert per_metric["mae"] == {"count": 1, "min": 1.0, "max": 1.0, "mean": 1.0}


def test_get_experiment_summary_none_where_metric_absent(
    tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    log_run(tracker, "a", {"loss": 0.5})
    log_run(tracker, "b", {"loss": 0.25})
    summary = get_experiment_summary(experiment_name)
    assert summary["total_runs"] == summary["finished_runs"] == 2
    assert summary["failed_runs"] == 0
    assert summary["best_r2"] is None
    assert summary["best_rmse"] is None
    assert summary["avg_r2"] is None
    assert summary["metrics"] == {"loss": {"count": 2, "min": 0.25, "max": 0.5, "mean": 0.375}}


# ---------------------------------------------------------------- delete_experiment_runs


def test_delete_experiment_runs_dry_run_then_real(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    scores = {"r1": 0.1, "r2": 0.5, "r3": 0.9, "r4": 0.3, "r5": 0.7}
    ids = {name: log_run(tracker, name, {"r2_score": s}) for name, s in scores.items()}
    ids["bare"] = log_run(tracker, "bare", {"loss": 1.0})  # no r2_score: goes first
    doomed = {ids[n] for n in ("r1", "r4", "bare")}
    kept = {ids[n] for n in ("r3", "r5", "r2")}

    live = MLflowExperimentTracker(experiment_name=experiment_name)
    with live.start_run(run_name="still-running"):
        live.log_metric("r2_score", 0.0)  # the worst, yet never deleted while RUNNING
        running = live.run_id

        preview = delete_experiment_runs(experiment_name, keep_top_n=3)
        assert {r["run_id"] for r in preview} == doomed
        assert all(set(r) == RUN_KEYS for r in preview)
        stages = {
            r.info.run_id: r.info.lifecycle_stage for r in experiment_runs(client, experiment_name)
        }
        assert set(stages.values()) == {LifecycleStage.ACTIVE} and len(stages) == 7

        deleted = delete_experiment_runs(experiment_name, keep_top_n=3, dry_run=False)
        assert {r["run_id"] for r in deleted} == doomed

        for run_id in doomed:
            assert client.get_run(run_id).info.lifecycle_stage == LifecycleStage.DELETED
        for run_id in {*kept, running}:  # type: ignore[assignment]
            assert client.get_run(run_id).info.lifecycle_stage == LifecycleStage.ACTIVE
        assert client.get_run(running).info.status == "RUNNING"
        visible = {r.info.run_id for r in experiment_runs(client, experiment_name)}
        assert visible == {*kept, running}
        assert get_experiment_summary(experiment_name)["total_runs"] == 4

    for run_id in doomed:  # MLflow's deleted stage: restorable
        client.restore_run(run_id)
        restored = client.get_run(run_id)
        assert restored.info.lifecycle_stage == LifecycleStage.ACTIVE
    assert get_run_by_name(experiment_name, "r1") is not None
    assert get_experiment_summary(experiment_name)["total_runs"] == 7


def test_delete_experiment_runs_ascending(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    ids = {n: log_run(tracker, n, {"rmse": v}) for n, v in {"a": 3.0, "b": 1.0, "c": 2.0}.items()}
    deleted = delete_experiment_runs(
        experiment_name, keep_top_n=1, metric="rmse", ascending=True, dry_run=False
    )
    assert {r["run_id"] for r in deleted} == {ids["a"], ids["c"]}
    assert client.get_run(ids["b"]).info.lifecycle_stage == LifecycleStage.ACTIVE


def test_delete_experiment_runs_nan_is_never_among_the_best(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    # created in this order, MLflow lists them newest first: nan, 0.9, 0.7, 0.5
    ids = {v: log_run(tracker, f"r{v}", {"r2_score": v}) for v in (0.5, 0.7, 0.9)}
    nan_run = log_run(tracker, "nan", {"r2_score": math.nan})
    deleted = delete_experiment_runs(experiment_name, keep_top_n=2, dry_run=False)
    assert {r["run_id"] for r in deleted} == {ids[0.5], nan_run}
    assert client.get_run(ids[0.7]).info.lifecycle_stage == LifecycleStage.ACTIVE


def test_delete_experiment_runs_unknown_metric_deletes_nothing(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    """A misspelt metric must not rank every run as metric-less and delete them all."""
    ids = [log_run(tracker, f"r{i}", {"r2_score": i / 10}) for i in range(3)]
    with pytest.raises(LookupError, match="r2-score"):
        delete_experiment_runs(experiment_name, keep_top_n=1, metric="r2-score", dry_run=False)
    for run_id in ids:
        assert client.get_run(run_id).info.lifecycle_stage == LifecycleStage.ACTIVE


# ---------------------------------------------------------------- paging


def test_queries_page_past_the_first_page(
    client: MlflowClient,
    tracker: MLflowExperimentTracker,
    experiment_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asynctrack.utils, "_PAGE", 3)
    pages: list[int] = []
    search = MlflowClient.search_runs

    def counting(self: MlflowClient, *args: Any, **kw: Any) -> Any:
        pages.append(kw.get("max_results", 0))
        return search(self, *args, **kw)

    monkeypatch.setattr(MlflowClient, "search_runs", counting)
    # The oldest run is the best: it comes last in MLflow's newest-first order.
    ids = [log_run(tracker, f"run-{i}", {"r2_score": 0.9 - i / 100}) for i in range(8)]

    pages.clear()
    assert get_best_run(experiment_name)["run_id"] == ids[0]
    assert pages == [3, 3, 3]  # three pages of at most 3
    assert get_best_run(experiment_name, ascending=True)["run_id"] == ids[7]
    table = compare_runs(experiment_name, top_n=100)
    assert table["run_id"].tolist() == ids
    assert get_experiment_summary(experiment_name)["total_runs"] == 8
    run = get_run_by_name(experiment_name, "run-0")
    assert run is not None and run["run_id"] == ids[0]
    preview = delete_experiment_runs(experiment_name, keep_top_n=2)
    assert {r["run_id"] for r in preview} == set(ids[2:])


# ---------------------------------------------------------------- missing things


def test_missing_experiment_metric_and_model_raise_lookup_error(
    tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    log_run(tracker, "a", {"r2_score": 0.5})
    ghost = f"{experiment_name}-ghost"
    calls = [
        lambda: get_best_run(ghost),
        lambda: get_run_by_name(ghost, "a"),
        lambda: compare_runs(ghost),
        lambda: get_experiment_summary(ghost),
        lambda: delete_experiment_runs(ghost, keep_top_n=1),
        lambda: load_best_model(ghost),
        lambda: register_best_model(ghost, "whatever"),
    ]
    for call in calls:
        with pytest.raises(LookupError, match=ghost):
            call()  # type: ignore[no-untyped-call]

    with pytest.raises(LookupError, match="accuracy"):
        get_best_run(experiment_name, metric="accuracy")
    with pytest.raises(LookupError, match="accuracy"):
        compare_runs(experiment_name, metrics=["r2_score", "accuracy"])
    with pytest.raises(LookupError, match="accuracy"):
        load_best_model(experiment_name, metric="accuracy")
    # runs with the metric, none with a model
    with pytest.raises(LookupError, match=rf"{experiment_name}.*model"):
        load_best_model(experiment_name)
    with pytest.raises(LookupError, match=rf"{experiment_name}.*model"):
        register_best_model(experiment_name, f"{experiment_name}-reg")

    missing_model = f"{experiment_name}-no-such-model"
    with pytest.raises(LookupError, match=missing_model):
        transition_model_stage(missing_model, "1", "Production")


# ---------------------------------------------------------------- models


def log_model_run(
    tracker: MLflowExperimentTracker, name: str, model: Any, data: Data
) -> tuple[str, float]:
    """A run that logs ``model`` (an MLflow 3 logged model of the run) and its r2 score."""
    score = float(model.score(data.X_test, data.y_test))
    with tracker.start_run(run_name=name):
        tracker.log_metrics({"r2_score": score, "rmse": -score})
        tracker.log_model(
            model, name="model", input_example=data.X_test.head(3), pip_requirements=REQUIREMENTS
        )
    assert tracker.run_id is not None
    return tracker.run_id, score


@pytest.fixture
def two_models(tracker: MLflowExperimentTracker, data: Data) -> dict[str, tuple[str, Any]]:
    """Two runs with models: ``good`` (LinearRegression) and ``poor`` (a heavy Ridge)."""
    good = LinearRegression().fit(data.X_train, data.y_train)
    poor = Ridge(alpha=50.0).fit(data.X_train, data.y_train)
    good_id, good_score = log_model_run(tracker, "good", good, data)
    poor_id, poor_score = log_model_run(tracker, "poor", poor, data)
    assert good_score > poor_score
    return {"good": (good_id, good), "poor": (poor_id, poor)}


def test_load_best_model_predicts_like_the_original(
    experiment_name: str, data: Data, two_models: dict[str, tuple[str, Any]]
) -> None:
    loaded = load_best_model(experiment_name)
    np.testing.assert_allclose(
        loaded.predict(data.X_test), two_models["good"][1].predict(data.X_test)
    )
    # rmse is logged as -score here, so the lowest is the good model and the highest the poor
    worst = load_best_model(experiment_name, metric="rmse")
    np.testing.assert_allclose(
        worst.predict(data.X_test), two_models["poor"][1].predict(data.X_test)
    )
    best_low = load_best_model(experiment_name, metric="rmse", ascending=True)
    np.testing.assert_allclose(
        best_low.predict(data.X_test), two_models["good"][1].predict(data.X_test)
    )


def test_register_transition_and_list_models(
    client: MlflowClient,
    experiment_name: str,
    data: Data,
    two_models: dict[str, tuple[str, Any]],
) -> None:
    name = model_name(experiment_name)
    good_id, good = two_models["good"]
    poor_id, poor = two_models["poor"]

    v1 = register_best_model(experiment_name, name)
    assert v1 == "1" and isinstance(v1, str)
    assert client.get_model_version(name, v1).run_id == good_id
    v2 = register_best_model(experiment_name, name, metric="rmse")  # highest rmse: poor
    assert v2 == "2"
    assert client.get_model_version(name, v2).run_id == poor_id

    models = list_registered_models()
    assert list(models.columns) == ["name", "latest_version", "latest_stage", "aliases"]
    row = models[models["name"] == name].iloc[0]
    assert str(row["latest_version"]) == "2"
    assert row["latest_stage"] == "None"
    assert row["aliases"] == {}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # beats pytest's filters: any leak is recorded
        transition_model_stage(name, v1, "Production")
    leaked = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not leaked, [str(w.message) for w in leaked]

    assert client.get_model_version(name, v1).current_stage == "Production"
    assert client.get_model_version_by_alias(name, "production").version == v1
    prod = mlflow.sklearn.load_model(f"models:/{name}@production")  # MLFLOW_TRACKING_URI
    np.testing.assert_allclose(prod.predict(data.X_test), good.predict(data.X_test))

    # a new Production version archives the old one and takes over the alias
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transition_model_stage(name, int(v2), "Production", archive_existing=True)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert client.get_model_version(name, v2).current_stage == "Production"
    assert client.get_model_version(name, v1).current_stage == "Archived"
    assert client.get_model_version_by_alias(name, "production").version == v2
    prod = mlflow.sklearn.load_model(f"models:/{name}@production")  # MLFLOW_TRACKING_URI
    np.testing.assert_allclose(prod.predict(data.X_test), poor.predict(data.X_test))

    models = list_registered_models()
    row = models[models["name"] == name].iloc[0]
    assert row["latest_stage"] == "Production"
    assert row["aliases"] == {"production": "2"}


def test_transition_moves_the_stage_alias_with_the_version(
    client: MlflowClient,
    experiment_name: str,
    two_models: dict[str, tuple[str, Any]],
) -> None:
    """A version that leaves a stage no longer answers to that stage's alias."""
    name = model_name(experiment_name)
    version = register_best_model(experiment_name, name)
    transition_model_stage(name, version, "Staging")
    assert client.get_model_version_by_alias(name, "staging").version == version
    transition_model_stage(name, version, "Production")
    assert client.get_model_version(name, version).current_stage == "Production"
    assert client.get_model_version_by_alias(name, "production").version == version
    aliases = client.get_registered_model(name).aliases
    assert aliases == {"production": version}  # no stale "staging" alias left behind
    transition_model_stage(name, version, "Archived")  # archive_existing=True, the default
    assert client.get_model_version(name, version).current_stage == "Archived"
    assert client.get_registered_model(name).aliases == {"archived": version}
    transition_model_stage(name, version, "None")
    assert client.get_model_version(name, version).current_stage == "None"
    assert client.get_registered_model(name).aliases == {}
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "production")


def test_load_best_model_right_after_log_model(
    tracker: MLflowExperimentTracker, experiment_name: str, data: Data
) -> None:
    """Read-your-writes covers models too: the query waits for the model being stored."""
    model = LinearRegression().fit(data.X_train, data.y_train)
    with tracker.start_run(run_name="fresh-model"):
        tracker.log_metric("r2_score", float(model.score(data.X_test, data.y_test)))
        tracker.log_model(model, name="model", pip_requirements=REQUIREMENTS)
        loaded = load_best_model(experiment_name)
        np.testing.assert_allclose(loaded.predict(data.X_test), model.predict(data.X_test))
