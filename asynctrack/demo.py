"""``asynctrack demo``: the original specification's pipeline on scikit-learn's diabetes data.

With no tracking URI configured it writes to an embedded local store, a SQLite database and
an artifact folder in one directory, so it runs on a fresh machine with no server. Steps:
gradient boosting through the tracker with its train and test loss at every boosting
iteration (curves in MLflow's charts), a random forest through the decorators, a 5-fold
cross-validation and the 3x3 grid search with nested runs, residual plots and the grid as
artifacts. The two runs that logged a model are ranked by r2_score on the held-out data and
the better one is registered and given the ``production`` alias. Every random choice is
seeded, so two runs of the demo log the same numbers.
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
    compare_runs,
    flush,
    get_experiment_summary,
    log_params_decorator,
    mlflow_run,
    register_best_model,
    stats,
    transition_model_stage,
)

GRID = {"n_estimators": [100, 200, 300], "max_depth": [5, 10, 15]}


def local_store(directory: Path) -> str:
    """An embedded SQLite store in ``directory``; return its tracking URI."""
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory.resolve() / 'mlflow.db'}"


def _experiment(name: str, artifacts: Path | None) -> None:
    """Create the experiment; on the local store its artifacts live beside the database."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        location = artifacts.resolve().as_uri() if artifacts is not None else None
        client.create_experiment(name, artifact_location=location)


def _residual_plot(y_true: Any, y_pred: Any, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(y_pred, y_true - y_pred, s=12, alpha=0.7)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("residual")
    ax.set_title(title)
    fig.tight_layout()
    return fig


SEED = 42


def _store(tracking_uri: str | None, store_dir: Path) -> tuple[str, Path | None]:
    """The tracking URI, and where artifacts go when it is a local SQLite store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        return local_store(store_dir), store_dir / "artifacts"
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///").split("?")[0])
        db.parent.mkdir(parents=True, exist_ok=True)
        return uri, db.parent / "artifacts"
    return uri, None


def run_demo(
    experiment_name: str,
    tracking_uri: str | None,
    store_dir: Path,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    import matplotlib.pyplot as plt
    import mlflow
    from mlflow import MlflowClient
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    from sklearn.model_selection import KFold, train_test_split

    np.random.seed(SEED)  # every estimator and split below also gets its own seed
    uri, artifacts = _store(tracking_uri, store_dir)
    mlflow.set_tracking_uri(uri)
    say(f"Tracking to {uri}")
    _experiment(experiment_name, artifacts)
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=SEED)

    def scores(model: Any) -> dict[str, float]:
        y_pred = model.predict(X_test)
        return {
            "r2_score": float(r2_score(y_test, y_pred)),
            "rmse": float(np.sqrt(mean_squared_error(y_test, y_pred))),
            "mae": float(mean_absolute_error(y_test, y_pred)),
        }

    with_model: dict[str, float] = {}  # run name -> r2_score, for the runs that log a model

    say("[1/5] gradient boosting through the tracker: train/test loss at every iteration")
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)
    with tracker.start_run(run_name="gb-optimized"):
        tracker.set_tags({"model_type": "GradientBoosting", "stage": "optimization"})
        params = {"n_estimators": 300, "max_depth": 2, "learning_rate": 0.02, "subsample": 0.5}
        tracker.log_params(params)
        gb = GradientBoostingRegressor(**params, random_state=SEED).fit(X_train, y_train)
        stages = zip(gb.staged_predict(X_train), gb.staged_predict(X_test), strict=True)
        for step, (on_train, on_test) in enumerate(stages, start=1):
            tracker.log_metric("train_loss", float(mean_squared_error(y_train, on_train)), step)
            tracker.log_metric("test_loss", float(mean_squared_error(y_test, on_test)), step)
        tracker.log_metrics(scores(gb))
        with_model["gb-optimized"] = scores(gb)["r2_score"]
        fig = _residual_plot(y_test, gb.predict(X_test), "gb-optimized")
        tracker.log_figure(fig, "plots/residuals.png")
        plt.close(fig)
        tracker.log_model(
            gb, "model", input_example=X_test.head(5), skops_trusted_types=_trusted(gb)
        )

    say("[2/5] random forest through the decorators")

    @mlflow_run(experiment_name=experiment_name, run_name="rf-experiment")
    @log_params_decorator
    def run_experiment(
        n_estimators: int = 100, max_depth: int = 10, min_samples_split: int = 2
    ) -> Any:
        model = RandomForestRegressor(
            n_estimators=n_estimators,
            max_depth=max_depth,
            min_samples_split=min_samples_split,
            random_state=SEED,
            n_jobs=-1,
        ).fit(X_train, y_train)
        mlflow.log_metrics(scores(model))  # fluent calls land in the decorator's run
        mlflow.sklearn.log_model(
            model, name="model", input_example=X_test.head(5), skops_trusted_types=_trusted(model)
        )
        return model

    rf = run_experiment(n_estimators=200, max_depth=15, min_samples_split=5)
    with_model["rf-experiment"] = scores(rf)["r2_score"]

    say("[3/5] 5-fold cross-validation with nested runs")
    with MLflowExperimentTracker(experiment_name=experiment_name, run_name="rf-cv") as parent:
        parent.log_params({"model": "RandomForest", "cv_folds": 5})
        folds = KFold(5, shuffle=True, random_state=SEED).split(X)
        fold_scores = []
        for fold, (train_idx, val_idx) in enumerate(folds):
            with NestedRunTracker(run_name=f"fold-{fold}") as child:
                model = RandomForestRegressor(n_estimators=50, random_state=fold, n_jobs=-1)
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

    say("[4/5] 3x3 grid search with nested runs")
    with MLflowExperimentTracker(experiment_name=experiment_name, run_name="rf-grid") as grid:
        grid.log_params({"search_type": "grid", "model": "RandomForest"})
        grid.log_dict(GRID, "param_grid.json")
        best_score, best_params = -np.inf, {}
        for n_est in GRID["n_estimators"]:
            for depth in GRID["max_depth"]:
                with NestedRunTracker(run_name=f"n{n_est}_d{depth}") as child:
                    child.log_params({"n_estimators": n_est, "max_depth": depth})
                    model = RandomForestRegressor(
                        n_estimators=n_est, max_depth=depth, random_state=SEED, n_jobs=-1
                    ).fit(X_train, y_train)
                    score = float(model.score(X_test, y_test))
                    child.log_metrics({"r2_score": score})
                    if score > best_score:
                        best_score, best_params = score, {"n_estimators": n_est, "max_depth": depth}
        grid.log_params({"best_" + k: v for k, v in best_params.items()})
        grid.log_metrics({"best_r2_score": best_score})

    say("[5/5] registering the best model and giving it the production alias")
    flush()
    model_name = f"{experiment_name}-production"
    version = register_best_model(experiment_name, model_name, metric="r2_score")
    transition_model_stage(model_name, version, "Production", archive_existing=True)
    source = MlflowClient().get_model_version(model_name, version).run_id
    chosen = MlflowClient().get_run(source).info.run_name if source else "?"
    others = ", ".join(f"{n} {r:.4f}" for n, r in with_model.items() if n != chosen)
    say(
        f"Registered {model_name} version {version} from run {chosen}: the best r2_score on "
        f"the held-out 20% ({with_model.get(chosen, float('nan')):.4f}, against {others}) "
        f"of the runs that logged a model; the grid and cross-validation runs log scores only."
    )
    say(f"Load it with mlflow.sklearn.load_model('models:/{model_name}@production')")

    table = compare_runs(experiment_name, metrics=["r2_score", "rmse"], top_n=5)
    say("\nBest runs by r2_score:")
    say(table[["run_name", "metric_r2_score", "metric_rmse"]].to_string(index=False, na_rep="-"))
    summary = get_experiment_summary(experiment_name)
    say(
        f"\n{summary['total_runs']} runs ({summary['finished_runs']} finished, "
        f"{summary['failed_runs']} failed); best r2 {summary['best_r2']:.4f}, "
        f"best rmse {summary['best_rmse']:.2f}, mean r2 {summary['avg_r2']:.4f}; "
        f"{stats().sent} events stored"
    )
    if artifacts is not None:
        say(_after(uri, experiment_name))
    return {
        "tracking_uri": uri,
        "runs": summary["total_runs"],
        "model_version": version,
        "registered_run": chosen,
    }


def _after(uri: str, experiment: str) -> str:
    """What to type next, for a local store."""
    return (
        "\nNext (with the venv active: source .venv/bin/activate):\n"
        f"  mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000\n"
        f"  export MLFLOW_TRACKING_URI={uri}\n"
        f"  asynctrack runs compare {experiment} --metric r2_score --metric rmse\n"
        f"  asynctrack plot {experiment} --metric test_loss --run gb-optimized"
    )


def _trusted(model: Any) -> list[str]:
    """The types skops (MLflow 3's default sklearn format) must be told to load: only
    those of the model we just trained."""
    from skops.io import dumps, get_untrusted_types

    return list(get_untrusted_types(data=dumps(model)))
