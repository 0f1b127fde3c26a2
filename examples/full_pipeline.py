"""The seed's "Полный пайплайн эксперимента": a tracker run, a decorated run, the analysis.

Run with MLFLOW_TRACKING_URI pointing at a server (or nothing: MLflow's local default).
"""

from __future__ import annotations

import mlflow
import numpy as np
from _data import X_test, X_train, y_test, y_train
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.metrics import mean_squared_error, r2_score

from asynctrack import (
    MLflowExperimentTracker,
    compare_runs,
    get_best_run,
    log_params_decorator,
    mlflow_run,
)

# Вариант 1: Через контекстный менеджер
tracker = MLflowExperimentTracker(experiment_name="boston-housing")

with tracker.start_run(run_name="rf-optimized"):
    tracker.set_tags({"model_type": "RandomForest", "stage": "optimization"})

    params = {"n_estimators": 200, "max_depth": 15, "min_samples_split": 5}
    tracker.log_params(params)

    model = RandomForestRegressor(**params, random_state=42)
    model.fit(X_train, y_train)

    y_pred = model.predict(X_test)
    tracker.log_metrics(
        {
            "r2_score": r2_score(y_test, y_pred),
            "rmse": np.sqrt(mean_squared_error(y_test, y_pred)),
        }
    )

    tracker.log_model(model, "model", input_example=X_test.head())


# Вариант 2: Через декораторы
@mlflow_run(experiment_name="boston-housing", run_name="gb-experiment")
@log_params_decorator
def run_experiment(n_estimators=100, max_depth=5, learning_rate=0.1):  # type: ignore[no-untyped-def]
    model = GradientBoostingRegressor(
        n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate
    )
    model.fit(X_train, y_train)

    y_pred = model.predict(X_test)
    mlflow.log_metrics(
        {
            "r2_score": r2_score(y_test, y_pred),
            "rmse": np.sqrt(mean_squared_error(y_test, y_pred)),
        }
    )

    return model


model = run_experiment(n_estimators=150, max_depth=8, learning_rate=0.05)


# Анализ результатов
best = get_best_run("boston-housing")
print(f"Лучший результат: R² = {best['metrics']['r2_score']:.4f}")

comparison = compare_runs("boston-housing", top_n=5)
print(comparison)
