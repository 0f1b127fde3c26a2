"""The decorators on a real MLflow server: ``mlflow_run``, ``log_params_decorator``,
``log_metrics_decorator``, ``timed_execution``, sync and async, alone and composed.

Every test reads back what the server holds; synchronisation is a run's end or flush().
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import mlflow
import numpy as np
import pytest
from conftest import Data
from mlflow import MlflowClient
from mlflow.entities import Run
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from asynctrack import (
    MLflowExperimentTracker,
    NoActiveRunError,
    log_metrics_decorator,
    log_params_decorator,
    mlflow_run,
    timed_execution,
)

PARENT = "mlflow.parentRunId"


def runs_of(client: MlflowClient, experiment_name: str) -> list[Run]:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"experiment {experiment_name!r} was not created"
    return list(client.search_runs([experiment.experiment_id]))


def only_run(client: MlflowClient, experiment_name: str) -> Run:
    runs = runs_of(client, experiment_name)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


class Boom(Exception):
    pass


# ---------------------------------------------------------------------- mlflow_run


def test_mlflow_run_names_tags_times_and_returns(
    client: MlflowClient, experiment_name: str
) -> None:
    sentinel = object()
    seen: list[str] = []

    @mlflow_run(experiment_name, run_name="rf-baseline", tags={"team": "ds", "version": 2})
    def train_model(n_estimators: int = 10) -> object:
        active = mlflow.active_run()
        assert active is not None
        seen.append(active.info.run_id)
        sum(range(10_000))
        return sentinel

    assert train_model() is sentinel

    run = only_run(client, experiment_name)
    assert run.info.run_id == seen[0]
    assert run.info.run_name == "rf-baseline"
    assert run.info.status == "FINISHED"
    assert run.data.tags["team"] == "ds"
    assert run.data.tags["version"] == "2"
    assert set(run.data.metrics) == {"duration_seconds"}
    assert run.data.metrics["duration_seconds"] > 0
    assert PARENT not in run.data.tags
    assert mlflow.active_run() is None


def test_mlflow_run_exception_escapes_unchanged_and_run_fails(
    client: MlflowClient, experiment_name: str
) -> None:
    error = Boom("diverged")

    @mlflow_run(experiment_name, run_name="will-fail")
    def train() -> None:
        mlflow.log_metric("loss", 0.5)
        raise error

    with pytest.raises(Boom) as caught:
        train()
    assert caught.value is error

    run = only_run(client, experiment_name)
    assert run.info.status == "FAILED"
    assert run.data.metrics["loss"] == 0.5
    assert "duration_seconds" in run.data.metrics
    assert mlflow.active_run() is None


def test_mlflow_run_keyboard_interrupt_kills_run(
    client: MlflowClient, experiment_name: str
) -> None:
    @mlflow_run(experiment_name)
    def train() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train()
    assert only_run(client, experiment_name).info.status == "KILLED"


async def test_mlflow_run_async(client: MlflowClient, experiment_name: str) -> None:
    @mlflow_run(experiment_name, run_name="async-run", tags={"kind": "coroutine"})
    async def train(x: int) -> int:
        return x * 2

    @mlflow_run(experiment_name, run_name="async-fail")
    async def broken() -> None:
        raise Boom("async")

    assert await train(21) == 42
    with pytest.raises(Boom, match=r"^async$"):
        await broken()

    runs = {r.info.run_name: r for r in runs_of(client, experiment_name)}
    assert set(runs) == {"async-run", "async-fail"}
    assert runs["async-run"].info.status == "FINISHED"
    assert runs["async-run"].data.tags["kind"] == "coroutine"
    assert "duration_seconds" in runs["async-run"].data.metrics
    assert runs["async-fail"].info.status == "FAILED"


def test_mlflow_run_inside_tracker_run_is_a_child(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    @mlflow_run(experiment_name, run_name="step")
    def step(i: int) -> int:
        mlflow.log_metric("i", i)
        return i

    @mlflow_run(experiment_name, run_name="outer-decorated")
    def outer() -> None:
        step(100)

    with tracker.start_run(run_name="parent"):
        parent_id = tracker.run_id
        assert [step(i) for i in range(2)] == [0, 1]
        tracker.log_metric("after_children", 1.0)
    outer()

    runs = runs_of(client, experiment_name)
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    parent = by_name["parent"][0]
    assert parent.info.run_id == parent_id
    assert parent.data.metrics == {"after_children": 1.0}
    children = sorted(
        (r for r in by_name["step"] if r.data.tags.get(PARENT) == parent_id),
        key=lambda r: r.data.metrics["i"],
    )
    assert [r.data.metrics["i"] for r in children] == [0, 1]
    assert all(r.info.status == "FINISHED" for r in runs)
    # @mlflow_run inside another @mlflow_run call: a child of that call's run
    outer_run = by_name["outer-decorated"][0]
    assert PARENT not in outer_run.data.tags
    nested = [r for r in by_name["step"] if r.data.tags.get(PARENT) == outer_run.info.run_id]
    assert [r.data.metrics["i"] for r in nested] == [100]


# ---------------------------------------------------------------------- log_params_decorator


def test_log_params_decorator_binds_args_defaults_and_kwargs_scalars(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    class Model:
        pass

    @log_params_decorator
    def train(
        X: Any,
        n_estimators: int,
        max_depth: int = 10,
        learning_rate: float = 0.1,
        layers: tuple[int, ...] = (64, 32),
        criterion: str = "squared_error",
        warm_start: bool = False,
        seed: Any = None,
        **kwargs: Any,
    ) -> str:
        return "trained"

    with tracker.start_run(run_name="params"):
        result = train(
            np.zeros((3, 2)),
            50,
            learning_rate=np.float64(0.05),
            verbose=True,
            note="first try",
            n_jobs=np.int64(2),
            callbacks=[print],
            weights=np.ones(3),
            model=Model(),
            options={"a": 1},
        )
        run_id = tracker.run_id
    assert result == "trained"

    params = client.get_run(run_id).data.params
    assert params == {
        "n_estimators": "50",
        "max_depth": "10",
        "learning_rate": "0.05",
        "criterion": "squared_error",
        "warm_start": "False",
        "seed": "None",
        "verbose": "True",
        "note": "first try",
        "n_jobs": "2",
    }


async def test_log_params_decorator_async(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    @log_params_decorator
    async def fit(alpha: float, l1_ratio: float = 0.5, *, tol: float = 1e-4) -> float:
        return alpha + l1_ratio

    async with tracker.start_run(run_name="async-params"):
        assert await fit(0.25) == 0.75
        run_id = tracker.run_id
    assert client.get_run(run_id).data.params == {
        "alpha": "0.25",
        "l1_ratio": "0.5",
        "tol": "0.0001",
    }


# ---------------------------------------------------------------------- log_metrics_decorator


def test_log_metrics_decorator_seed_evaluate(
    client: MlflowClient, tracker: MLflowExperimentTracker, data: Data
) -> None:
    model = RandomForestRegressor(n_estimators=10, random_state=0).fit(data.X_train, data.y_train)

    @log_metrics_decorator(["r2_score", "rmse", "mae"])
    def evaluate(model: Any, X: Any, y: Any) -> dict[str, Any]:
        y_pred = model.predict(X)
        return {
            "r2_score": r2_score(y, y_pred),
            "rmse": np.sqrt(mean_squared_error(y, y_pred)),
            "mae": mean_absolute_error(y, y_pred),
            "n_samples": len(y),  # returned, but not among the keys: not logged
        }

    with tracker.start_run(run_name="evaluate"):
        metrics = evaluate(model, data.X_test, data.y_test)
        run_id = tracker.run_id

    assert set(metrics) == {"r2_score", "rmse", "mae", "n_samples"}
    stored = client.get_run(run_id).data.metrics
    assert stored == {k: float(metrics[k]) for k in ("r2_score", "rmse", "mae")}


def test_log_metrics_decorator_missing_key_warns(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    @log_metrics_decorator(["accuracy", "f1_macro"])
    def evaluate() -> dict[str, float]:
        return {"accuracy": 0.875}

    with tracker.start_run(run_name="missing"):
        with pytest.warns(UserWarning, match="f1_macro"):
            assert evaluate() == {"accuracy": 0.875}
        run_id = tracker.run_id
    assert client.get_run(run_id).data.metrics == {"accuracy": 0.875}


def test_log_metrics_decorator_non_dict_raises_type_error(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    calls: list[int] = []

    @log_metrics_decorator(["r2_score"])
    def evaluate() -> Any:
        calls.append(1)
        return [0.9]

    with tracker.start_run(run_name="not-a-dict"):
        tracker.log_metric("before", 1.0)
        with pytest.raises(TypeError, match="dict"):
            evaluate()
        run_id = tracker.run_id
    assert calls == [1]
    with pytest.raises(TypeError, match="list of keys"):
        log_metrics_decorator("r2_score")
    run = client.get_run(run_id)
    assert run.data.metrics == {"before": 1.0}
    assert run.info.status == "FINISHED"


def test_log_metrics_decorator_type_error_fails_the_decorated_run(
    client: MlflowClient, experiment_name: str
) -> None:
    @mlflow_run(experiment_name)
    @log_metrics_decorator(["r2_score"])
    def evaluate() -> Any:
        return 0.9

    with pytest.raises(TypeError):
        evaluate()
    assert only_run(client, experiment_name).info.status == "FAILED"


async def test_log_metrics_decorator_async(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    @log_metrics_decorator(["loss"])
    async def evaluate() -> dict[str, float]:
        return {"loss": 0.125, "other": 3.0}

    @log_metrics_decorator(["loss"])
    async def broken() -> Any:
        return "loss"

    async with tracker.start_run(run_name="async-metrics"):
        assert await evaluate() == {"loss": 0.125, "other": 3.0}
        with pytest.raises(TypeError):
            await broken()
        run_id = tracker.run_id
    assert client.get_run(run_id).data.metrics == {"loss": 0.125}


# ---------------------------------------------------------------------- timed_execution


def test_timed_execution_logs_named_duration(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    @timed_execution
    def expensive_computation(n: int) -> int:
        return sum(range(n))

    with tracker.start_run(run_name="timed"):
        assert expensive_computation(100_000) == sum(range(100_000))
        run_id = tracker.run_id
    metrics = client.get_run(run_id).data.metrics
    assert set(metrics) == {"expensive_computation_duration_seconds"}
    assert metrics["expensive_computation_duration_seconds"] > 0


async def test_timed_execution_async(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    @timed_execution
    async def fetch_batch() -> str:
        return "batch"

    async with tracker.start_run(run_name="timed-async"):
        assert await fetch_batch() == "batch"
        run_id = tracker.run_id
    assert set(client.get_run(run_id).data.metrics) == {"fetch_batch_duration_seconds"}


# ---------------------------------------------------------------------- wrappers keep the function


def _sync_target(a: int, /, b: str = "x", *args: float, c: bool = True, **kw: Any) -> str:
    """Sync docstring."""
    return f"{a}{b}"


async def _async_target(a: int, /, b: str = "x", *args: float, c: bool = True, **kw: Any) -> str:
    """Async docstring."""
    return f"{a}{b}"


DECORATORS: dict[str, Callable[[Any], Any]] = {
    "mlflow_run": mlflow_run("never-called"),
    "log_params_decorator": log_params_decorator,
    "log_metrics_decorator": log_metrics_decorator(["m"]),
    "timed_execution": timed_execution,
}


@pytest.mark.parametrize("target", [_sync_target, _async_target], ids=["sync", "async"])
@pytest.mark.parametrize("name", list(DECORATORS))
def test_decorators_keep_signature_and_metadata(name: str, target: Callable[..., Any]) -> None:
    wrapped = DECORATORS[name](target)
    assert wrapped is not target
    assert inspect.signature(wrapped) == inspect.signature(target)
    assert wrapped.__name__ == target.__name__
    assert wrapped.__qualname__ == target.__qualname__
    assert wrapped.__doc__ == target.__doc__
    assert wrapped.__wrapped__ is target
    assert inspect.iscoroutinefunction(wrapped) == inspect.iscoroutinefunction(target)


# ---------------------------------------------------------------------- no run


@pytest.mark.parametrize(
    "name", ["log_params_decorator", "log_metrics_decorator", "timed_execution"]
)
async def test_logging_decorator_without_run_raises(client: MlflowClient, name: str) -> None:
    decorator = DECORATORS[name]

    @decorator
    def plain(x: int = 1) -> dict[str, float]:
        return {"m": 1.0}

    @decorator
    async def coro(x: int = 1) -> dict[str, float]:
        return {"m": 1.0}

    assert mlflow.active_run() is None
    with pytest.raises(NoActiveRunError, match="no run is active"):
        plain()
    with pytest.raises(NoActiveRunError):
        await coro()
    assert issubclass(NoActiveRunError, RuntimeError)


# ---------------------------------------------------------------------- composition


def test_seed_combination_example(client: MlflowClient, experiment_name: str, data: Data) -> None:
    """The seed's "Комбинирование декораторов": fluent mlflow.log_metrics lands in the run."""
    X_train, X_test, y_train, y_test = data

    @mlflow_run(experiment_name=experiment_name, run_name="rf-tuned")
    @log_params_decorator
    def train_and_evaluate(n_estimators: int = 100, max_depth: int = 10) -> Any:
        model = RandomForestRegressor(
            n_estimators=n_estimators, max_depth=max_depth, random_state=0
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

    # The seed uses n_estimators=200, max_depth=15; smaller keeps the test fast.
    model = train_and_evaluate(n_estimators=20, max_depth=6)

    run = only_run(client, experiment_name)
    y_pred = model.predict(X_test)
    assert run.info.run_name == "rf-tuned"
    assert run.info.status == "FINISHED"
    assert run.data.params == {"n_estimators": "20", "max_depth": "6"}
    assert run.data.metrics["r2_score"] == r2_score(y_test, y_pred)
    assert run.data.metrics["rmse"] == float(np.sqrt(mean_squared_error(y_test, y_pred)))
    assert set(run.data.metrics) == {"r2_score", "rmse", "duration_seconds"}


def _outside_in(experiment_name: str, data: Data) -> Callable[..., dict[str, float]]:
    @timed_execution
    @log_metrics_decorator(["r2_score", "rmse"])
    @log_params_decorator
    @mlflow_run(experiment_name, run_name="outside-in", tags={"order": "reversed"})
    def train_and_evaluate(n_estimators: int = 10, max_depth: int = 4) -> dict[str, float]:
        model = RandomForestRegressor(
            n_estimators=n_estimators, max_depth=max_depth, random_state=0
        )
        model.fit(data.X_train, data.y_train)
        y_pred = model.predict(data.X_test)
        mlflow.log_metric("fluent", 1.0)
        return {
            "r2_score": float(r2_score(data.y_test, y_pred)),
            "rmse": float(np.sqrt(mean_squared_error(data.y_test, y_pred))),
        }

    return train_and_evaluate


def test_composition_with_mlflow_run_innermost(
    client: MlflowClient, experiment_name: str, data: Data
) -> None:
    train_and_evaluate = _outside_in(experiment_name, data)
    result = train_and_evaluate(n_estimators=8)

    run = only_run(client, experiment_name)
    assert run.info.run_name == "outside-in"
    assert run.info.status == "FINISHED"
    assert run.data.tags["order"] == "reversed"
    assert run.data.params == {"n_estimators": "8", "max_depth": "4"}
    metrics = run.data.metrics
    assert set(metrics) == {
        "r2_score",
        "rmse",
        "fluent",
        "duration_seconds",
        "train_and_evaluate_duration_seconds",
    }
    assert metrics["r2_score"] == result["r2_score"]
    assert metrics["rmse"] == result["rmse"]
    assert mlflow.active_run() is None


async def test_composition_with_mlflow_run_innermost_async(
    client: MlflowClient, experiment_name: str
) -> None:
    @log_metrics_decorator(["score"])
    @timed_execution
    @log_params_decorator
    @mlflow_run(experiment_name, run_name="async-outside-in")
    async def search(alpha: float = 0.5) -> dict[str, float]:
        return {"score": alpha * 2}

    @log_params_decorator
    @mlflow_run(experiment_name, run_name="async-outside-in-fails")
    async def broken(alpha: float = 0.5) -> None:
        raise Boom("inner")

    assert await search(alpha=0.25) == {"score": 0.5}
    with pytest.raises(Boom):
        await broken()

    runs = {r.info.run_name: r for r in runs_of(client, experiment_name)}
    assert set(runs) == {"async-outside-in", "async-outside-in-fails"}
    ok = runs["async-outside-in"]
    assert ok.info.status == "FINISHED"
    assert ok.data.params == {"alpha": "0.25"}
    assert set(ok.data.metrics) == {"score", "search_duration_seconds", "duration_seconds"}
    assert ok.data.metrics["score"] == 0.5
    failed = runs["async-outside-in-fails"]
    assert failed.info.status == "FAILED"
    assert failed.data.params == {"alpha": "0.5"}


def test_composition_outside_in_exception_fails_the_one_run(
    client: MlflowClient, experiment_name: str
) -> None:
    error = Boom("outer order")

    @timed_execution
    @log_params_decorator
    @mlflow_run(experiment_name, run_name="fails")
    def train(lr: float = 0.1) -> None:
        raise error

    with pytest.raises(Boom) as caught:
        train(lr=0.3)
    assert caught.value is error
    run = only_run(client, experiment_name)
    assert run.info.status == "FAILED"
    assert run.data.params == {"lr": "0.3"}


def test_composition_outside_in_inside_parent_logs_to_child(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    """Grid search written with decorators: each call is a child run holding its own params."""

    @log_metrics_decorator(["score"])
    @log_params_decorator
    @mlflow_run(experiment_name, run_name="point")
    def point(depth: int) -> dict[str, float]:
        return {"score": depth / 10}

    with tracker.start_run(run_name="search"):
        parent_id = tracker.run_id
        for depth in (3, 5):
            point(depth)

    runs = runs_of(client, experiment_name)
    parent = next(r for r in runs if r.info.run_id == parent_id)
    children = sorted(
        (r for r in runs if r.data.tags.get(PARENT) == parent_id),
        key=lambda r: r.data.params.get("depth", ""),
    )
    assert parent.data.params == {}
    assert parent.data.metrics == {}
    assert [r.data.params for r in children] == [{"depth": "3"}, {"depth": "5"}]
    assert [r.data.metrics["score"] for r in children] == [0.3, 0.5]
