"""The seed's examples in ``examples/``, run as scripts against the test server; then the
server is asked what they logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from asynctrack import MLflowExperimentTracker

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PARENT = "mlflow.parentRunId"
# The artifact methods come with issue 3; until they are in, these examples cannot finish.
needs_artifacts = pytest.mark.xfail(
    not all(hasattr(MLflowExperimentTracker, m) for m in ("log_model", "log_dict")),
    reason="needs artifacts (issue 3)",
    strict=False,
)


def run_example(script: str, tracking_uri: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    done = subprocess.run(
        [sys.executable, script],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def runs_of(client: MlflowClient, experiment_name: str) -> list[Run]:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return list(client.search_runs([experiment.experiment_id], max_results=1000))


@needs_artifacts
def test_full_pipeline(client: MlflowClient, mlflow_tracking_uri: str) -> None:
    before = {r.info.run_id for r in runs_of(client, "boston-housing")}
    done = run_example("full_pipeline.py", mlflow_tracking_uri)
    new = {
        r.info.run_name: r for r in runs_of(client, "boston-housing") if r.info.run_id not in before
    }
    assert set(new) == {"rf-optimized", "gb-experiment"}
    assert all(r.info.status == "FINISHED" for r in new.values())

    rf = new["rf-optimized"]
    assert rf.data.params == {"n_estimators": "200", "max_depth": "15", "min_samples_split": "5"}
    assert {"model_type": "RandomForest", "stage": "optimization"}.items() <= rf.data.tags.items()
    assert set(rf.data.metrics) == {"r2_score", "rmse"}
    assert 0 < rf.data.metrics["r2_score"] < 1 and rf.data.metrics["rmse"] > 0

    gb = new["gb-experiment"]
    assert gb.data.params == {"n_estimators": "150", "max_depth": "8", "learning_rate": "0.05"}
    assert set(gb.data.metrics) == {"r2_score", "rmse", "duration_seconds"}  # @mlflow_run times
    assert gb.data.metrics["duration_seconds"] > 0

    # tracker.log_model: an MLflow 3 logged model of the run, loadable, with its input example
    experiment_id = rf.info.experiment_id
    models = [
        m for m in client.search_logged_models([experiment_id]) if m.source_run_id == rf.info.run_id
    ]
    assert len(models) == 1 and models[0].name == "model"
    assert str(models[0].status) in ("READY", "LoggedModelStatus.READY")
    assert [o.model_id for o in client.get_run(rf.info.run_id).outputs.model_outputs] == [
        models[0].model_id
    ]

    # the analysis the script prints: the best of the experiment and the comparison table
    scored = [r for r in runs_of(client, "boston-housing") if "r2_score" in r.data.metrics]
    best = max(scored, key=lambda r: r.data.metrics["r2_score"])
    assert f"Лучший результат: R² = {best.data.metrics['r2_score']:.4f}" in done.stdout
    table = done.stdout.splitlines()[1:]  # compare_runs(top_n=5), best first
    assert "run_id" in table[0] and best.info.run_id in table[1]


@needs_artifacts
def test_grid_search(client: MlflowClient, mlflow_tracking_uri: str) -> None:
    before = {r.info.run_id for r in runs_of(client, "boston-grid-search")}
    run_example("grid_search.py", mlflow_tracking_uri)
    new = [r for r in runs_of(client, "boston-grid-search") if r.info.run_id not in before]
    parents = [r for r in new if PARENT not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in new if r.data.tags.get(PARENT) == parent.info.run_id]
    assert len(children) == 9 and len(new) == 10
    assert all(r.info.status == "FINISHED" for r in new)

    grid = {
        (int(c.data.params["n_estimators"]), int(c.data.params["max_depth"])): c for c in children
    }
    assert set(grid) == {(n, d) for n in (100, 200, 300) for d in (5, 10, 15)}
    for (n, d), child in grid.items():
        assert child.info.run_name == f"n{n}_d{d}"
        assert set(child.data.metrics) == {"r2_score"}

    best_n, best_d = max(grid, key=lambda k: grid[k].data.metrics["r2_score"])
    assert parent.data.params == {
        "search_type": "grid",
        "model": "RandomForest",
        "best_n_estimators": str(best_n),
        "best_max_depth": str(best_d),
    }
    assert parent.data.metrics == {"best_r2_score": grid[(best_n, best_d)].data.metrics["r2_score"]}

    # parent.log_dict: the grid as JSON among the parent's artifacts
    uri = f"runs:/{parent.info.run_id}/param_grid.json"
    assert mlflow.artifacts.load_dict(uri) == {
        "n_estimators": [100, 200, 300],
        "max_depth": [5, 10, 15],
    }
    text = mlflow.artifacts.load_text(uri)
    assert json.loads(text)["max_depth"] == [5, 10, 15]
