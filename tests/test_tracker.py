"""MLflowExperimentTracker and NestedRunTracker against a real MLflow server.

Every test logs through asynctrack, synchronises with a flush or the run's end, and reads
back what the server holds through ``MlflowClient``.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections.abc import Callable

import mlflow
import pytest

import asynctrack
from asynctrack import (
    MLflowExperimentTracker,
    NestedRunTracker,
    NoActiveRunError,
    ParamConflictError,
)

PARENT = "mlflow.parentRunId"


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """The metric's history as the server returns it: (step, value), in its order."""
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# ---------------------------------------------------------------------------- seed examples


def test_seed_tracker_example(client: mlflow.MlflowClient, experiment_name: str) -> None:
    """The seed's MLflowExperimentTracker example, without artifacts and models."""
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)
    with tracker.start_run(run_name="gradient-boosting-v1"):
        tracker.set_tags(
            {"model_type": "GradientBoosting", "framework": "sklearn", "author": "ds-team"}
        )
        tracker.log_params({"n_estimators": 200, "max_depth": 10, "learning_rate": 0.1})
        tracker.log_metrics({"r2_score": 0.91, "rmse": 2.5, "mae": 1.75})
        run_id = tracker.run_id
        experiment_id = tracker.experiment_id
        artifact_uri = tracker.artifact_uri
        assert run_id is not None
        assert client.get_run(run_id).info.status == "RUNNING"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "gradient-boosting-v1"
    assert run.info.experiment_id == experiment_id
    assert client.get_experiment(experiment_id).name == experiment_name
    assert run.info.artifact_uri == artifact_uri
    assert run.data.params == {"n_estimators": "200", "max_depth": "10", "learning_rate": "0.1"}
    assert run.data.metrics == {"r2_score": 0.91, "rmse": 2.5, "mae": 1.75}
    assert {k: run.data.tags[k] for k in ("model_type", "framework", "author")} == {
        "model_type": "GradientBoosting",
        "framework": "sklearn",
        "author": "ds-team",
    }
    # The properties keep naming the last run after it ended.
    assert tracker.run_id == run_id


def test_start_run_tags_and_single_logging_calls(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run(run_name="single", tags={"team": "vision", "priority": 1}):
        tracker.log_param("optimizer", "adam")
        tracker.set_tag("stage", "dev")
        tracker.log_metric("loss", 0.5)
        tracker.log_metric("loss", 0.25, step=1)
        tracker.log_metrics({"acc": 0.75, "f1": 0.5}, step=3)
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.run_name == "single"
    assert run.data.tags["team"] == "vision"
    assert run.data.tags["priority"] == "1"
    assert run.data.tags["stage"] == "dev"
    assert run.data.params == {"optimizer": "adam"}
    assert history(client, run_id, "loss") == [(0, 0.5), (1, 0.25)]
    assert history(client, run_id, "acc") == [(3, 0.75)]
    assert history(client, run_id, "f1") == [(3, 0.5)]


def test_metric_timestamps(client: mlflow.MlflowClient, tracker: MLflowExperimentTracker) -> None:
    with tracker.start_run():
        tracker.log_metric("explicit", 1.0, step=0, timestamp=1_600_000_000_123)
        before_ms = time.time_ns() // 1_000_000
        tracker.log_metric("implicit", 2.0)
        tracker.log_metrics({"a": 1.0, "b": 2.0})
        after_ms = time.time_ns() // 1_000_000
        run_id = tracker.run_id
    (explicit,) = client.get_metric_history(run_id, "explicit")
    assert explicit.timestamp == 1_600_000_000_123
    (implicit,) = client.get_metric_history(run_id, "implicit")
    assert before_ms <= implicit.timestamp <= after_ms + 1  # rounded to the nearest ms
    (a,) = client.get_metric_history(run_id, "a")
    (b,) = client.get_metric_history(run_id, "b")
    assert a.timestamp == b.timestamp  # one call, one timestamp


def test_tracker_as_context_manager_starts_run_and_creates_experiment(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    assert client.get_experiment_by_name(experiment_name) is None
    with MLflowExperimentTracker(experiment_name=experiment_name, run_name="ctx") as t:
        assert t.run_id is not None
        t.log_metric("m", 1.0)
        running = client.get_run(t.run_id)
        assert running.info.status == "RUNNING"
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    assert experiment.lifecycle_stage == "active"
    run = client.get_run(t.run_id)
    assert run.info.experiment_id == experiment.experiment_id == t.experiment_id
    assert run.info.run_name == "ctx"
    assert run.info.status == "FINISHED"
    assert history(client, t.run_id, "m") == [(0, 1.0)]


def test_default_experiment_name_comes_from_the_environment(
    client: mlflow.MlflowClient, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
    with MLflowExperimentTracker() as t:
        t.log_metric("m", 1.0)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    assert client.get_run(t.run_id).info.experiment_id == experiment.experiment_id


def test_deleted_experiment_is_refused_clearly(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    client.delete_experiment(client.create_experiment(experiment_name))
    with (
        pytest.raises(ValueError, match="deleted"),
        MLflowExperimentTracker(experiment_name=experiment_name),
    ):
        pytest.fail("no run may start in a deleted experiment")


def test_two_runs_of_one_experiment_reuse_it(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    with tracker.start_run():
        tracker.log_metric("m", 1.0)
        first = tracker.run_id
    with tracker.start_run():
        tracker.log_metric("m", 2.0)
        second = tracker.run_id
    assert first != second
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in runs} == {first, second}
    assert history(client, first, "m") == [(0, 1.0)]
    assert history(client, second, "m") == [(0, 2.0)]


# ---------------------------------------------------------------------------- nested runs


def test_nested_children_link_to_parent(client: mlflow.MlflowClient, experiment_name: str) -> None:
    """The seed's cross-validation example."""
    scores = [0.8, 0.82, 0.79, 0.85, 0.81]
    child_ids = []
    with MLflowExperimentTracker(experiment_name=experiment_name) as parent:
        parent.log_params({"model": "RandomForest", "cv_folds": 5})
        for fold, score in enumerate(scores):
            with NestedRunTracker(run_name=f"fold-{fold}") as child:
                child.log_metrics({"fold_score": score})
                child_ids.append(child.run_id)
        parent.log_metrics({"mean_cv_score": sum(scores) / 5, "best": max(scores)})
        parent_id = parent.run_id

    parent_run = client.get_run(parent_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params == {"model": "RandomForest", "cv_folds": "5"}
    assert parent_run.data.metrics == {"mean_cv_score": sum(scores) / 5, "best": 0.85}
    assert PARENT not in parent_run.data.tags
    assert len(set(child_ids)) == 5
    for fold, (child_id, score) in enumerate(zip(child_ids, scores, strict=True)):
        run = client.get_run(child_id)
        assert run.data.tags[PARENT] == parent_id
        assert run.info.run_name == f"fold-{fold}"
        assert run.info.experiment_id == parent_run.info.experiment_id
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {"fold_score": score}
        assert run.data.params == {}


def test_nested_run_without_parent_raises(client: mlflow.MlflowClient) -> None:
    with pytest.raises(NoActiveRunError, match="parent"), NestedRunTracker(run_name="orphan"):
        pass


def test_seed_grid_search(client: mlflow.MlflowClient, experiment_name: str) -> None:
    """The seed's grid search with nested runs (without log_dict)."""
    param_grid = {"n_estimators": [100, 200, 300], "max_depth": [5, 10, 15]}

    def score_of(n_est: int, depth: int) -> float:
        return round(1.0 - abs(n_est - 200) / 1000 - abs(depth - 10) / 100, 6)

    with MLflowExperimentTracker(experiment_name=experiment_name) as parent:
        parent.log_params({"search_type": "grid", "model": "RandomForest"})
        best_score = 0.0
        best_params: dict[str, int] = {}
        for n_est, depth in itertools.product(param_grid["n_estimators"], param_grid["max_depth"]):
            with NestedRunTracker(run_name=f"n{n_est}_d{depth}") as child:
                child.log_params({"n_estimators": n_est, "max_depth": depth})
                score = score_of(n_est, depth)
                child.log_metrics({"r2_score": score})
                if score > best_score:
                    best_score = score
                    best_params = {"n_estimators": n_est, "max_depth": depth}
        parent.log_params({"best_" + k: v for k, v in best_params.items()})
        parent.log_metrics({"best_r2_score": best_score})
        parent_id = parent.run_id
        experiment_id = parent.experiment_id

    parent_run = client.get_run(parent_id)
    assert parent_run.data.params == {
        "search_type": "grid",
        "model": "RandomForest",
        "best_n_estimators": "200",
        "best_max_depth": "10",
    }
    assert parent_run.data.metrics == {"best_r2_score": 1.0}
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_id}'")  # type: ignore[list-item]
    assert len(children) == 9
    seen = set()
    for run in children:
        n_est, depth = int(run.data.params["n_estimators"]), int(run.data.params["max_depth"])
        seen.add((n_est, depth))
        assert run.info.run_name == f"n{n_est}_d{depth}"
        assert run.info.status == "FINISHED"
        assert run.data.metrics == {"r2_score": score_of(n_est, depth)}
    assert seen == set(itertools.product([100, 200, 300], [5, 10, 15]))


# ---------------------------------------------------------------------------- volume


def test_100k_log_metric_calls_all_stored_in_order(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    n = 100_000
    with tracker.start_run():
        log_metric = tracker.log_metric
        for i in range(n):
            log_metric("loss", i * 0.5, step=i)
        run_id = tracker.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    stored = history(client, run_id, "loss")
    assert len(stored) == n
    assert stored == [(i, i * 0.5) for i in range(n)]


# ---------------------------------------------------------------------------- run end


def test_exception_marks_run_failed_and_propagates_unchanged(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    error = ValueError("boom")
    with pytest.raises(ValueError) as info, tracker.start_run():
        tracker.log_metric("before_error", 1.0, step=7)
        tracker.log_param("p", "kept")
        raise error
    assert info.value is error
    assert info.value.args == ("boom",)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert history(client, tracker.run_id, "before_error") == [(7, 1.0)]
    assert run.data.params == {"p": "kept"}


def test_keyboard_interrupt_marks_run_killed(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with pytest.raises(KeyboardInterrupt), tracker.start_run():
        tracker.log_metric("m", 3.0)
        raise KeyboardInterrupt
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert history(client, tracker.run_id, "m") == [(0, 3.0)]


def test_child_failure_caught_by_parent(client: mlflow.MlflowClient, experiment_name: str) -> None:
    with MLflowExperimentTracker(experiment_name=experiment_name) as parent:
        with pytest.raises(ZeroDivisionError), NestedRunTracker(run_name="bad-fold") as child:
            child.log_metric("fold_score", 0.5)
            _ = 1 / 0
        with pytest.raises(KeyboardInterrupt), NestedRunTracker(run_name="stopped") as stopped:
            raise KeyboardInterrupt
        parent.log_metric("after_children", 1.0)
    assert client.get_run(child.run_id).info.status == "FAILED"
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    assert history(client, child.run_id, "fold_score") == [(0, 0.5)]
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics == {"after_children": 1.0}


def test_interrupt_in_child_kills_child_and_parent(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)
    with (
        pytest.raises(KeyboardInterrupt),
        tracker.start_run(),
        NestedRunTracker(run_name="child") as child,
    ):
        child.log_metric("m", 1.0)
        raise KeyboardInterrupt
    assert client.get_run(child.run_id).info.status == "KILLED"
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert history(client, child.run_id, "m") == [(0, 1.0)]


def test_log_after_run_end_raises(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        tracker.log_metric("m", 1.0)
        run_id = tracker.run_id
    with pytest.raises(NoActiveRunError):
        tracker.log_metric("m", 2.0, step=1)
    with pytest.raises(NoActiveRunError):
        tracker.log_param("p", 1)
    with pytest.raises(NoActiveRunError):
        tracker.set_tag("t", "x")
    tracker.flush()
    assert history(client, run_id, "m") == [(0, 1.0)]
    assert client.get_run(run_id).data.params == {}


def test_log_before_any_run_raises(tracker: MLflowExperimentTracker) -> None:
    with pytest.raises(NoActiveRunError, match="start_run"):
        tracker.log_metric("m", 1.0)
    with pytest.raises(NoActiveRunError):
        tracker.log_metrics({"m": 1.0})


# ---------------------------------------------------------------------------- concurrency


PER_THREAD = 1000


def _eight_threads(
    tracker: MLflowExperimentTracker, start: Callable[[Callable[[], None]], threading.Thread]
) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for j in range(PER_THREAD):
                tracker.log_metric(f"thread_{worker}", float(j), step=j)
                tracker.log_metric("shared", float(worker), step=worker * PER_THREAD + j)
            tracker.log_param(f"worker_{worker}", worker)
            tracker.set_tag(f"done_{worker}", "yes")
        except BaseException as exc:
            errors.append(exc)

    threads = [start(lambda w=w: work(w)) for w in range(8)]  # type: ignore[misc]
    for thread in threads:
        thread.join()
    return errors


def _check_eight_threads(client: mlflow.MlflowClient, run_id: str) -> None:
    for worker in range(8):
        assert history(client, run_id, f"thread_{worker}") == [
            (j, float(j)) for j in range(PER_THREAD)
        ]
    shared = sorted(history(client, run_id, "shared"))
    assert shared == [(s, float(s // PER_THREAD)) for s in range(8 * PER_THREAD)]
    run = client.get_run(run_id)
    assert run.data.params == {f"worker_{w}": str(w) for w in range(8)}
    assert all(run.data.tags[f"done_{w}"] == "yes" for w in range(8))


def test_eight_threads_log_to_one_run_with_copied_context(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    """Threads that carry the caller's context (as asyncio.to_thread does) log to its run."""

    def start(fn: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=contextvars.copy_context().run, args=(fn,))
        thread.start()
        return thread

    with tracker.start_run():
        errors = _eight_threads(tracker, start)
        run_id = tracker.run_id
    assert errors == []
    _check_eight_threads(client, run_id)


def test_eight_plain_threads_log_to_one_run(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    """The natural way to write it: threads started inside the run use the tracker."""

    def start(fn: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=fn)
        thread.start()
        return thread

    with tracker.start_run():
        errors = _eight_threads(tracker, start)
        run_id = tracker.run_id
    assert errors == []
    _check_eight_threads(client, run_id)


# ---------------------------------------------------------------------------- tags, params


def test_last_set_tag_wins(client: mlflow.MlflowClient, tracker: MLflowExperimentTracker) -> None:
    with tracker.start_run():
        for i in range(500):
            tracker.set_tag("phase", f"value-{i}")
        run_id = tracker.run_id
    assert client.get_run(run_id).data.tags["phase"] == "value-499"


def test_last_set_tag_wins_across_many_batches(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    """Interleaved params force several log_batch calls; they must land in order."""
    with tracker.start_run():
        for i in range(500):
            tracker.log_param(f"p{i}", i)
            tracker.set_tag("phase", f"value-{i}")
            if i % 97 == 0:
                tracker.flush()
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.data.tags["phase"] == "value-499"
    assert run.data.params == {f"p{i}": str(i) for i in range(500)}


def test_param_same_value_is_noop_and_different_value_raises(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        tracker.log_param("lr", 0.1)
        tracker.log_param("lr", 0.1)  # same value: nothing happens
        tracker.log_params({"lr": 0.1, "layers": 3})
        tracker.log_metric("loss", 1.0)
        with pytest.raises(ParamConflictError, match="lr") as info:
            tracker.log_param("lr", 0.2)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, asynctrack.AsyncTrackError)
        # A conflict in a dict names the bad key and still logs the good ones.
        with pytest.raises(ParamConflictError, match="layers"):
            tracker.log_params({"layers": 4, "dropout": 0.5})
        tracker.log_metric("loss", 0.5, step=1)
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "layers": "3", "dropout": "0.5"}
    assert history(client, run_id, "loss") == [(0, 1.0), (1, 0.5)]


def test_param_relogged_with_same_string_sends_nothing(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        tracker.log_param("optimizer", "adam")
        tracker.flush()
        before = tracker.stats()
        tracker.log_param("optimizer", "adam")
        tracker.flush()
        after = tracker.stats()
        run_id = tracker.run_id
    assert client.get_run(run_id).data.params == {"optimizer": "adam"}
    assert after.sent - before.sent == 0


# ---------------------------------------------------------------------------- interop, stats


def test_fluent_mlflow_calls_land_in_tracker_run(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        active = mlflow.active_run()
        assert active is not None
        assert active.info.run_id == tracker.run_id
        mlflow.log_metric("fluent_metric", 2.5, step=4)
        mlflow.log_param("fluent_param", "yes")
        mlflow.set_tag("fluent_tag", "on")
        tracker.log_metric("tracker_metric", 1.5)
        run_id = tracker.run_id
    assert mlflow.active_run() is None
    run = client.get_run(run_id)
    assert history(client, run_id, "fluent_metric") == [(4, 2.5)]
    assert history(client, run_id, "tracker_metric") == [(0, 1.5)]
    assert run.data.params == {"fluent_param": "yes"}
    assert run.data.tags["fluent_tag"] == "on"
    assert run.info.status == "FINISHED"


def test_fluent_active_run_follows_nesting(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    with MLflowExperimentTracker(experiment_name=experiment_name) as parent:
        with NestedRunTracker(run_name="child") as child:
            assert mlflow.active_run().info.run_id == child.run_id
            mlflow.log_metric("inner", 1.0)
        assert mlflow.active_run().info.run_id == parent.run_id
        mlflow.log_metric("outer", 2.0)
    assert history(client, child.run_id, "inner") == [(0, 1.0)]
    assert history(client, parent.run_id, "outer") == [(0, 2.0)]
    assert client.get_run(child.run_id).data.metrics == {"inner": 1.0}
    assert client.get_run(parent.run_id).data.metrics == {"outer": 2.0}


def test_stats_count_sent_events_and_batches(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        asynctrack.flush()
        before = asynctrack.stats()
        for i in range(10):
            tracker.log_metric("m", float(i), step=i)
        tracker.log_params({"a": 1, "b": 2})
        tracker.set_tag("t", "x")
        asynctrack.flush()
        after = asynctrack.stats()
        run_id = tracker.run_id
    assert after.sent - before.sent == 13
    assert after.batches_sent - before.batches_sent >= 2
    assert after.rejected == before.rejected
    assert after.dropped == before.dropped
    mine = tracker.stats()  # this server's engine alone
    assert (mine.queued, mine.in_flight) == (0, 0)
    assert mine.sent >= 13
    assert len(history(client, run_id, "m")) == 10
