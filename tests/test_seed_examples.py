"""The seed document's examples, translated from ``src.tracking`` to ``asynctrack`` and run
against a real MLflow server on the diabetes data set (the seed's Boston housing is gone
from scikit-learn). Models are smaller than the seed's to keep the suite fast.

Lines that log artifacts or models (``log_artifact``, ``log_model``, ``log_dict``) are left
out: artifacts arrive with a later issue. ``get_best_run`` / ``compare_runs`` do not exist
yet; the tests read the same answers back with ``MlflowClient.search_runs``.
"""

from __future__ import annotations

from itertools import product
from typing import Any

import mlflow
import numpy as np
from conftest import Data
from mlflow import MlflowClient
from mlflow.entities import Run
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import KFold

from asynctrack import (
    MLflowExperimentTracker,
    NestedRunTracker,
    log_params_decorator,
    mlflow_run,
)

PARENT = "mlflow.parentRunId"


def runs_of(client: MlflowClient, experiment_name: str, **kwargs: Any) -> list[Run]:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"experiment {experiment_name!r} was not created"
    return list(client.search_runs([experiment.experiment_id], **kwargs))


def test_tracker_section_example(client: MlflowClient, experiment_name: str, data: Data) -> None:
    """Seed section "Контекстные менеджеры", MLflowExperimentTracker."""
    X_train, X_test, y_train, y_test = data
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)

    with tracker.start_run(run_name="gradient-boosting-v1"):
        tracker.set_tags(
            {
                "model_type": "GradientBoosting",
                "framework": "sklearn",
                "author": "data-science-team",
            }
        )
        tracker.log_params({"n_estimators": 20, "max_depth": 3, "learning_rate": 0.1})

        model = GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0)
        model.fit(X_train, y_train)

        y_pred = model.predict(X_test)
        expected = {
            "r2_score": r2_score(y_test, y_pred),
            "rmse": np.sqrt(mean_squared_error(y_test, y_pred)),
            "mae": mean_absolute_error(y_test, y_pred),
        }
        tracker.log_metrics(expected)
        # Skipped (artifacts not implemented yet): tracker.log_artifact(...), tracker.log_model(...)

        run_id, artifact_uri, experiment_id = (
            tracker.run_id,
            tracker.artifact_uri,
            tracker.experiment_id,
        )

    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.run_name == "gradient-boosting-v1"
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri == artifact_uri
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None and experiment.experiment_id == experiment_id
    tags = run.data.tags
    assert (tags["model_type"], tags["framework"], tags["author"]) == (
        "GradientBoosting",
        "sklearn",
        "data-science-team",
    )
    assert run.data.params == {"n_estimators": "20", "max_depth": "3", "learning_rate": "0.1"}
    assert run.data.metrics == {k: float(v) for k, v in expected.items()}


def test_nested_cv_example(client: MlflowClient, experiment_name: str, data: Data) -> None:
    """Seed section "Контекстные менеджеры", NestedRunTracker: 5 folds as child runs."""
    X, y = data.X_train.to_numpy(), data.y_train.to_numpy()
    model = RandomForestRegressor(n_estimators=10, max_depth=4, random_state=0)

    with MLflowExperimentTracker(experiment_name=experiment_name) as parent:
        parent.log_params({"model": "RandomForest", "cv_folds": 5})

        scores = []
        for fold, (train_idx, val_idx) in enumerate(KFold(5).split(X)):
            with NestedRunTracker(run_name=f"fold-{fold}") as child:
                model.fit(X[train_idx], y[train_idx])
                score = model.score(X[val_idx], y[val_idx])

                child.log_metrics({"fold_score": score})
                scores.append(score)

        parent.log_metrics({"mean_cv_score": np.mean(scores), "std_cv_score": np.std(scores)})
        parent_id = parent.run_id

    runs = runs_of(client, experiment_name)
    assert len(runs) == 6
    parent_run = next(r for r in runs if r.info.run_id == parent_id)
    assert parent_run.data.params == {"model": "RandomForest", "cv_folds": "5"}
    assert parent_run.data.metrics == {
        "mean_cv_score": float(np.mean(scores)),
        "std_cv_score": float(np.std(scores)),
    }
    children = {r.info.run_name: r for r in runs if r.data.tags.get(PARENT) == parent_id}
    assert sorted(children) == [f"fold-{i}" for i in range(5)]
    for fold, score in enumerate(scores):
        assert children[f"fold-{fold}"].data.metrics == {"fold_score": score}
    assert all(r.info.status == "FINISHED" for r in runs)


def test_full_pipeline(client: MlflowClient, experiment_name: str, data: Data) -> None:
    """Seed "Полный пайплайн эксперимента": Вариант 1 (tracker), Вариант 2 (decorators)."""
    X_train, X_test, y_train, y_test = data

    # Вариант 1: Через контекстный менеджер
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)

    with tracker.start_run(run_name="rf-optimized"):
        tracker.set_tags({"model_type": "RandomForest", "stage": "optimization"})

        params = {"n_estimators": 20, "max_depth": 15, "min_samples_split": 5}  # seed: 200 trees
        tracker.log_params(params)

        model = RandomForestRegressor(**params, random_state=42)
        model.fit(X_train, y_train)

        y_pred = model.predict(X_test)
        rf_metrics = {
            "r2_score": r2_score(y_test, y_pred),
            "rmse": np.sqrt(mean_squared_error(y_test, y_pred)),
        }
        tracker.log_metrics(rf_metrics)

        # Skipped (not implemented yet): tracker.log_model(model, "model", input_example=...)
        rf_id = tracker.run_id

    # Вариант 2: Через декораторы
    gb_metrics: dict[str, Any] = {}

    @mlflow_run(experiment_name=experiment_name, run_name="gb-experiment")
    @log_params_decorator
    def run_experiment(
        n_estimators: int = 100, max_depth: int = 5, learning_rate: float = 0.1
    ) -> None:
        model = GradientBoostingRegressor(
            n_estimators=n_estimators,
            max_depth=max_depth,
            learning_rate=learning_rate,
            random_state=0,
        )
        model.fit(X_train, y_train)

        y_pred = model.predict(X_test)
        gb_metrics.update(
            {
                "r2_score": r2_score(y_test, y_pred),
                "rmse": np.sqrt(mean_squared_error(y_test, y_pred)),
            }
        )
        mlflow.log_metrics(gb_metrics)

        return model  # type: ignore[no-any-return]

    model = run_experiment(n_estimators=15, max_depth=8, learning_rate=0.05)  # seed: 150
    assert isinstance(model, GradientBoostingRegressor)

    # Анализ результатов (get_best_run / compare_runs: read back with search_runs)
    ranked = runs_of(client, experiment_name, order_by=["metrics.r2_score DESC"], max_results=5)
    local = {"rf-optimized": rf_metrics["r2_score"], "gb-experiment": gb_metrics["r2_score"]}
    assert [r.info.run_name for r in ranked] == sorted(local, key=local.__getitem__, reverse=True)
    best = ranked[0]
    assert best.data.metrics["r2_score"] == max(rf_metrics["r2_score"], gb_metrics["r2_score"])

    runs = {r.info.run_name: r for r in ranked}
    rf, gb = runs["rf-optimized"], runs["gb-experiment"]
    assert rf.info.run_id == rf_id
    assert rf.data.tags["model_type"] == "RandomForest"
    assert rf.data.tags["stage"] == "optimization"
    assert rf.data.params == {k: str(v) for k, v in params.items()}
    assert rf.data.metrics == {k: float(v) for k, v in rf_metrics.items()}
    assert gb.data.params == {"n_estimators": "15", "max_depth": "8", "learning_rate": "0.05"}
    assert {k: gb.data.metrics[k] for k in gb_metrics} == {
        k: float(v) for k, v in gb_metrics.items()
    }
    assert "duration_seconds" in gb.data.metrics
    assert rf.info.status == gb.info.status == "FINISHED"


def test_grid_search_with_nested_runs(
    client: MlflowClient, experiment_name: str, data: Data
) -> None:
    """Seed "Grid Search с вложенными runs" (seed: 100/200/300 trees; here 5/10/15)."""  # noqa: RUF002
    X_train, X_test, y_train, y_test = data
    param_grid = {
        "n_estimators": [5, 10, 15],
        "max_depth": [5, 10, 15],
    }

    with MLflowExperimentTracker(experiment_name=experiment_name) as parent:
        parent.log_params({"search_type": "grid", "model": "RandomForest"})
        # Skipped (not implemented yet): parent.log_dict(param_grid, "param_grid.json")

        best_score = float("-inf")  # the seed starts at 0, which assumes some r2 > 0
        best_params: dict[str, int] = {}
        scores: dict[tuple[int, int], float] = {}

        for n_est, depth in product(param_grid["n_estimators"], param_grid["max_depth"]):
            with NestedRunTracker(run_name=f"n{n_est}_d{depth}") as child:
                child.log_params({"n_estimators": n_est, "max_depth": depth})

                model = RandomForestRegressor(n_estimators=n_est, max_depth=depth, random_state=0)
                model.fit(X_train, y_train)

                score = model.score(X_test, y_test)
                child.log_metrics({"r2_score": score})
                scores[(n_est, depth)] = score

                if score > best_score:
                    best_score = score
                    best_params = {"n_estimators": n_est, "max_depth": depth}

        parent.log_params({"best_" + k: v for k, v in best_params.items()})
        parent.log_metrics({"best_r2_score": best_score})
        parent_id = parent.run_id

    runs = runs_of(client, experiment_name)
    assert len(runs) == 10
    assert all(r.info.status == "FINISHED" for r in runs)
    parent_run = next(r for r in runs if r.info.run_id == parent_id)
    assert PARENT not in parent_run.data.tags
    children = [r for r in runs if r.data.tags.get(PARENT) == parent_id]
    assert len(children) == 9

    for child in children:  # type: ignore[assignment]
        n_est = int(child.data.params["n_estimators"])  # type: ignore[attr-defined]
        depth = int(child.data.params["max_depth"])  # type: ignore[attr-defined]
        assert child.info.run_name == f"n{n_est}_d{depth}"  # type: ignore[attr-defined]
        assert child.data.params == {"n_estimators": str(n_est), "max_depth": str(depth)}  # type: ignore[attr-defined]
        assert child.data.metrics == {"r2_score": scores[(n_est, depth)]}  # type: ignore[attr-defined]
    assert {r.info.run_name for r in children} == {
        f"n{n}_d{d}" for n, d in product(param_grid["n_estimators"], param_grid["max_depth"])
    }

    by_name = {r.info.run_name: r for r in children}
    best_r2 = max(r.data.metrics["r2_score"] for r in children)
    assert parent_run.data.metrics == {"best_r2_score": best_r2}
    assert parent_run.data.params == {
        "search_type": "grid",
        "model": "RandomForest",
        "best_n_estimators": str(best_params["n_estimators"]),
        "best_max_depth": str(best_params["max_depth"]),
    }
    best_name = f"n{best_params['n_estimators']}_d{best_params['max_depth']}"
    assert by_name[best_name].data.metrics["r2_score"] == best_r2
