"""The seed's "Grid Search с вложенными runs": a parent run with one child per grid point."""

from __future__ import annotations

from itertools import product

from _data import X_test, X_train, y_test, y_train
from sklearn.ensemble import RandomForestRegressor

from asynctrack import MLflowExperimentTracker, NestedRunTracker

param_grid = {
    "n_estimators": [100, 200, 300],
    "max_depth": [5, 10, 15],
}

with MLflowExperimentTracker(experiment_name="boston-grid-search") as parent:
    parent.log_params({"search_type": "grid", "model": "RandomForest"})
    parent.log_dict(param_grid, "param_grid.json")

    best_score = 0
    best_params = None

    for n_est, depth in product(param_grid["n_estimators"], param_grid["max_depth"]):
        with NestedRunTracker(run_name=f"n{n_est}_d{depth}") as child:
            child.log_params({"n_estimators": n_est, "max_depth": depth})

            model = RandomForestRegressor(n_estimators=n_est, max_depth=depth)
            model.fit(X_train, y_train)

            score = model.score(X_test, y_test)
            child.log_metrics({"r2_score": score})

            if score > best_score:
                best_score = score
                best_params = {"n_estimators": n_est, "max_depth": depth}

    assert best_params is not None
    parent.log_params({"best_" + k: v for k, v in best_params.items()})
    parent.log_metrics({"best_r2_score": best_score})
