"""``asynctrack demo``: the seed's pipeline on scikit-learn's diabetes data.

With no tracking URI configured it writes to an embedded local store (a SQLite database and
an artifact folder in one directory), so it runs on a fresh machine with no server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from asynctrack import (
    MLflowExperimentTracker,
    NestedRunTracker,
    flush,
    log_params_decorator,
    mlflow_run,
    stats,
)


def local_store(directory: Path) -> str:
    """Point MLflow at an embedded SQLite store in ``directory``; return its URI."""
    import mlflow

    directory.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{directory.resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def run_demo(
    experiment_name: str,
    tracking_uri: str | None,
    store_dir: Path,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    import mlflow
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.metrics import mean_squared_error, r2_score
    from sklearn.model_selection import KFold, train_test_split

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store(store_dir)
    mlflow.set_tracking_uri(uri)
    say(f"Tracking to {uri}")
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)

    def scores(model: Any) -> dict[str, float]:
        y_pred = model.predict(X_test)
        return {
            "r2_score": float(r2_score(y_test, y_pred)),
            "rmse": float(np.sqrt(mean_squared_error(y_test, y_pred))),
        }

    say("1/3 random forest through the tracker")
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)
    with tracker.start_run(run_name="rf-optimized"):
        tracker.set_tags({"model_type": "RandomForest", "stage": "optimization"})
        params = {"n_estimators": 100, "max_depth": 15, "min_samples_split": 5}
        tracker.log_params(params)
        model = RandomForestRegressor(**params, random_state=42).fit(X_train, y_train)
        tracker.log_metrics(scores(model))

    say("2/3 gradient boosting through the decorators")

    @mlflow_run(experiment_name=experiment_name, run_name="gb-experiment")
    @log_params_decorator
    def run_experiment(
        n_estimators: int = 100, max_depth: int = 5, learning_rate: float = 0.1
    ) -> Any:
        model = GradientBoostingRegressor(
            n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate
        ).fit(X_train, y_train)
        mlflow.log_metrics(scores(model))
        return model

    run_experiment(n_estimators=150, max_depth=3, learning_rate=0.05)

    say("3/3 5-fold cross-validation with nested runs")
    with MLflowExperimentTracker(experiment_name=experiment_name, run_name="rf-cv") as parent:
        parent.log_params({"model": "RandomForest", "cv_folds": 5})
        fold_scores = []
        for fold, (train_idx, val_idx) in enumerate(
            KFold(5, shuffle=True, random_state=0).split(X)
        ):
            with NestedRunTracker(run_name=f"fold-{fold}") as child:
                model = RandomForestRegressor(n_estimators=50, random_state=fold)
                model.fit(X.iloc[train_idx], y.iloc[train_idx])
                score = float(model.score(X.iloc[val_idx], y.iloc[val_idx]))
                child.log_metrics({"fold_score": score})
                fold_scores.append(score)
        parent.log_metrics(
            {
                "mean_cv_score": float(np.mean(fold_scores)),
                "std_cv_score": float(np.std(fold_scores)),
            }
        )
    flush()
    runs = mlflow.search_runs(experiment_names=[experiment_name], order_by=["start_time DESC"])
    say(f"{len(runs)} runs in experiment {experiment_name!r}; {stats().sent} events stored")
    if uri.startswith("sqlite:"):
        say(f"See them in the MLflow UI: mlflow ui --backend-store-uri {uri}")
    return {"tracking_uri": uri, "runs": len(runs)}
