"""Async use on a real MLflow server: ``async with`` runs, ``aflush``, concurrent tasks
sharing one tracker, and an event loop that keeps running while a large flush is awaited.

Synchronisation is ``await aflush()`` or a run's end, never a sleep.
"""

from __future__ import annotations

import asyncio

import anyio
import mlflow
import pytest
from mlflow import MlflowClient

import asynctrack
from asynctrack import (
    MLflowExperimentTracker,
    NestedRunTracker,
    NoActiveRunError,
    log_metrics_decorator,
    log_params_decorator,
    mlflow_run,
)

PARENT = "mlflow.parentRunId"


class Boom(Exception):
    pass


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------- async with


async def test_async_with_start_run(client: MlflowClient, tracker: MLflowExperimentTracker) -> None:
    async with tracker.start_run(run_name="async-run", tags={"mode": "async"}) as t:
        assert t is tracker
        run_id = tracker.run_id
        assert run_id is not None
        assert tracker.experiment_id is not None
        assert tracker.artifact_uri
        active = mlflow.active_run()
        assert active is not None and active.info.run_id == run_id
        t.log_params({"lr": 0.01, "optimizer": "adam"})
        t.set_tags({"stage": "train"})
        for step in range(100):
            t.log_metric("loss", 1.0 / (step + 1), step=step)
            if step % 10 == 0:
                await asyncio.sleep(0)
        t.log_metrics({"acc": 0.5, "f1": 0.25}, step=7)

    assert tracker.run_id == run_id  # the last run, after it ended
    assert mlflow.active_run() is None
    run = client.get_run(run_id)
    assert run.info.run_name == "async-run"
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.01", "optimizer": "adam"}
    assert run.data.tags["mode"] == "async"
    assert run.data.tags["stage"] == "train"
    assert history(client, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(100)]
    assert history(client, run_id, "acc") == [(7, 0.5)]
    assert history(client, run_id, "f1") == [(7, 0.25)]


async def test_async_with_experiment_tracker(client: MlflowClient, experiment_name: str) -> None:
    async with MLflowExperimentTracker(
        experiment_name=experiment_name, run_name="ctx", tags={"a": "b"}
    ) as t:
        t.log_metric("m", 3.5)
        t.log_param("p", 1)
        run_id = t.run_id
    assert run_id is not None

    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.run_name == "ctx"
    assert run.info.status == "FINISHED"
    assert run.data.tags["a"] == "b"
    assert run.data.params == {"p": "1"}
    assert run.data.metrics == {"m": 3.5}


async def test_async_with_nested_run_tracker(client: MlflowClient, experiment_name: str) -> None:
    scores = [0.5, 0.625, 0.75]
    child_ids: list[str] = []
    async with MLflowExperimentTracker(experiment_name=experiment_name) as parent:
        parent.log_params({"model": "RandomForest", "cv_folds": len(scores)})
        parent_id = parent.run_id
        for fold, score in enumerate(scores):
            async with NestedRunTracker(run_name=f"fold-{fold}", tags={"fold": fold}) as child:
                child.log_metrics({"fold_score": score})
                assert child.run_id is not None
                child_ids.append(child.run_id)
                await asyncio.sleep(0)
            assert parent.run_id == parent_id
        parent.log_metrics({"mean_cv_score": sum(scores) / len(scores)})
    assert parent_id is not None

    parent_run = client.get_run(parent_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params == {"model": "RandomForest", "cv_folds": "3"}
    assert parent_run.data.metrics == {"mean_cv_score": sum(scores) / len(scores)}
    assert PARENT not in parent_run.data.tags
    for fold, (child_id, score) in enumerate(zip(child_ids, scores, strict=True)):
        child_run = client.get_run(child_id)
        assert child_run.info.run_name == f"fold-{fold}"
        assert child_run.info.status == "FINISHED"
        assert child_run.info.experiment_id == parent_run.info.experiment_id
        assert child_run.data.tags[PARENT] == parent_id
        assert child_run.data.tags["fold"] == str(fold)
        assert child_run.data.metrics == {"fold_score": score}


async def test_async_nested_run_tracker_needs_a_parent(client: MlflowClient) -> None:
    with pytest.raises(NoActiveRunError):
        async with NestedRunTracker(run_name="orphan"):
            pass


# ---------------------------------------------------------------------- aflush


async def test_tracker_aflush_stores_everything_while_the_run_is_open(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    async with tracker.start_run(run_name="aflush") as t:
        for step in range(2500):
            t.log_metric("x", float(step), step=step)
        t.log_param("p", "v")
        t.set_tag("t", "1")
        await t.aflush()
        run = client.get_run(t.run_id or "")
        assert run.info.status == "RUNNING"
        assert run.data.params == {"p": "v"}
        assert run.data.tags["t"] == "1"
        assert history(client, run.info.run_id, "x") == [(s, float(s)) for s in range(2500)]


async def test_module_aflush(client: MlflowClient, tracker: MLflowExperimentTracker) -> None:
    async with tracker.start_run(run_name="module-aflush") as t:
        t.log_metrics({f"m{i}": float(i) for i in range(50)}, step=1)
        t.set_tag("last", "yes")
        await asynctrack.aflush()
        run = client.get_run(t.run_id or "")
        assert run.info.status == "RUNNING"
        assert run.data.metrics == {f"m{i}": float(i) for i in range(50)}
        assert run.data.tags["last"] == "yes"
        assert asynctrack.stats().queued == 0


# ---------------------------------------------------------------------- concurrent tasks


async def test_concurrent_tasks_share_one_tracker(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    steps, tasks = 200, 4
    all_open = asyncio.Barrier(tasks)  # type: ignore[attr-defined]

    async def worker(i: int) -> tuple[str, str]:
        async with tracker.start_run(run_name=f"task-{i}", tags={"task": i}) as t:
            run_id = t.run_id
            assert run_id is not None
            await all_open.wait()  # every task's run is open while they all log
            t.log_param("task", i)
            for step in range(steps):
                t.log_metric("value", i * 1000 + step, step=step)
                await asyncio.sleep(0)  # let the other tasks interleave
                assert t.run_id == run_id
            t.log_metrics({"final": float(i)})
            t.set_tag("owner", f"task-{i}")
            async with NestedRunTracker(run_name=f"child-{i}") as child:
                child.log_metric("child_of", float(i))
                await asyncio.sleep(0)
                child_id = child.run_id
                assert child_id is not None
            assert t.run_id == run_id
        return run_id, child_id

    ids = await asyncio.gather(*(worker(i) for i in range(tasks)))

    assert len({run_id for run_id, _ in ids}) == tasks
    for i, (run_id, child_id) in enumerate(ids):
        run = client.get_run(run_id)
        assert run.info.run_name == f"task-{i}"
        assert run.info.status == "FINISHED"
        assert run.data.params == {"task": str(i)}
        assert run.data.tags["task"] == str(i)
        assert run.data.tags["owner"] == f"task-{i}"
        assert run.data.metrics["final"] == float(i)
        assert history(client, run_id, "value") == [(s, float(i * 1000 + s)) for s in range(steps)]
        child = client.get_run(child_id)
        assert child.data.tags[PARENT] == run_id
        assert child.data.metrics == {"child_of": float(i)}


async def test_concurrent_decorated_coroutines_log_to_their_own_runs(
    client: MlflowClient, experiment_name: str
) -> None:
    all_open = asyncio.Barrier(5)  # type: ignore[attr-defined]

    @log_metrics_decorator(["score"])
    @log_params_decorator
    @mlflow_run(experiment_name)
    async def trial(trial_id: int, rounds: int = 20) -> dict[str, float]:
        await all_open.wait()  # every trial's run is open at once
        for _ in range(rounds):
            await asyncio.sleep(0)
        return {"score": trial_id / 10}

    results = await asyncio.gather(*(trial(i) for i in range(5)))
    assert results == [{"score": i / 10} for i in range(5)]

    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 5
    by_trial = {int(r.data.params["trial_id"]): r for r in runs}
    assert sorted(by_trial) == list(range(5))
    for i, run in by_trial.items():
        assert run.data.params == {"trial_id": str(i), "rounds": "20"}
        assert run.data.metrics["score"] == i / 10
        assert run.info.status == "FINISHED"


async def test_concurrent_tasks_fluent_calls_land_in_their_own_runs(
    client: MlflowClient, experiment_name: str
) -> None:
    """The seed's combination pattern (fluent mlflow.log_metric inside @mlflow_run), async."""

    both_active = asyncio.Barrier(2)  # type: ignore[attr-defined]

    @mlflow_run(experiment_name)
    async def trial(i: int) -> str:
        active = mlflow.active_run()
        assert active is not None
        await both_active.wait()  # both runs are open from here on
        for step in range(3):
            mlflow.log_metric("fluent", float(i), step=step)
            await asyncio.sleep(0)
        return active.info.run_id  # type: ignore[no-any-return]

    first, second = await asyncio.gather(trial(1), trial(2))
    assert history(client, first, "fluent") == [(s, 1.0) for s in range(3)]
    assert history(client, second, "fluent") == [(s, 2.0) for s in range(3)]


# ---------------------------------------------------------------------- event-loop liveness


async def test_heartbeat_keeps_ticking_while_a_large_flush_is_awaited(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    count = 50_000  # logged, then awaited with aflush()
    at_end = 10_000  # logged, then stored by the run's end (async with exit)
    ticks = 0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    try:
        async with tracker.start_run(run_name="big-flush") as t:
            run_id = t.run_id
            assert run_id is not None
            for step in range(count):
                t.log_metric("x", float(step), step=step)
            before = ticks
            await t.aflush()
            during_flush = ticks - before
            await asynctrack.aflush()  # nothing left: returns at once
            for step in range(at_end):
                t.log_metric("y", float(step), step=step)
            before = ticks
        during_run_end = ticks - before
    finally:
        stop.set()
        await beat

    # Liveness, not timing: the loop ran the heartbeat while the flush was awaited.
    assert during_flush > 3, f"heartbeat advanced {during_flush} ticks during aflush()"
    assert during_run_end > 3, f"heartbeat advanced {during_run_end} ticks during run end"
    stored = client.get_metric_history(run_id, "x")
    assert len(stored) == count
    assert sorted(m.step for m in stored) == list(range(count))
    assert all(m.value == float(m.step) for m in stored)
    assert history(client, run_id, "y") == [(s, float(s)) for s in range(at_end)]
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------- failures


async def test_exception_inside_async_with_fails_the_run(
    client: MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    error = Boom("async failure")
    with pytest.raises(Boom) as caught:
        async with tracker.start_run(run_name="fails") as t:
            t.log_metric("before", 1.0)
            await asyncio.sleep(0)
            raise error
    assert caught.value is error
    failed_id = tracker.run_id
    assert failed_id is not None

    with pytest.raises(Boom):
        async with MLflowExperimentTracker(experiment_name=experiment_name) as t2:
            ctx_id = t2.run_id
            raise Boom("ctx")

    async with tracker.start_run(run_name="parent") as parent:
        parent_id = parent.run_id
        with pytest.raises(Boom):
            async with NestedRunTracker(run_name="child") as child:
                child_id = child.run_id
                child.log_param("fold", 0)
                raise Boom("child")
        parent.log_metric("after_child", 1.0)

    failed = client.get_run(failed_id)
    assert failed.info.status == "FAILED"
    assert failed.data.metrics == {"before": 1.0}
    assert client.get_run(ctx_id or "").info.status == "FAILED"
    child_run = client.get_run(child_id or "")
    assert child_run.info.status == "FAILED"
    assert child_run.data.params == {"fold": "0"}
    assert child_run.data.tags[PARENT] == parent_id
    parent_run = client.get_run(parent_id or "")
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics == {"after_child": 1.0}
    assert mlflow.active_run() is None


async def test_cancelled_task_ends_its_run(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    inside = asyncio.Event()
    run_ids: list[str] = []

    async def job() -> None:
        async with tracker.start_run(run_name="cancelled") as t:
            t.log_metric("progress", 0.5)
            run_ids.append(t.run_id or "")
            inside.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(job())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    run = client.get_run(run_ids[0])
    assert run.info.status in ("FAILED", "KILLED")
    assert run.data.metrics == {"progress": 0.5}


async def test_anyio_cancel_scope_ends_its_run(
    client: MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    """anyio cancellation is level-triggered: run end must still reach the server."""
    run_ids: list[str] = []
    with anyio.CancelScope() as scope:
        async with tracker.start_run(run_name="anyio-cancelled") as t:
            t.log_metric("progress", 0.25)
            run_ids.append(t.run_id or "")
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught

    run = client.get_run(run_ids[0])
    assert run.info.status in ("FAILED", "KILLED")
    assert run.data.metrics == {"progress": 0.25}


async def test_anyio_cancel_scope_ends_a_decorated_run(
    client: MlflowClient, experiment_name: str
) -> None:
    run_ids: list[str] = []
    started = anyio.Event()

    @mlflow_run(experiment_name, run_name="decorated-cancelled")
    async def train() -> None:
        active = mlflow.active_run()
        assert active is not None
        run_ids.append(active.info.run_id)
        started.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            group.start_soon(train)
            await started.wait()
            scope.cancel()
    assert scope.cancelled_caught

    run = client.get_run(run_ids[0])
    assert run.info.status in ("FAILED", "KILLED")
    assert "duration_seconds" in run.data.metrics
