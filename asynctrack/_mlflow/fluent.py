"""Replacements for MLflow's fluent logging functions (``mlflow.log_metric`` and friends).

MLflow's own fluent call builds an ``MlflowClient`` each time (about 120 us, most of it a
registry-URI lookup that tries to import pyspark); these find the active run on MLflow's
run stack, look its sink up by run id and queue. What they cannot serve (a run of a
server the engine does not speak to, metrics tied to a logged model or a dataset) goes to
the MLflow function they replace, unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import mlflow.tracking.fluent as _fluent
from mlflow.entities import RunStatus
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.exceptions import MlflowException

from asynctrack._mlflow import private, routing, sink

#: The functions replaced, by name (in ``mlflow`` and ``mlflow.tracking.fluent`` alike).
NAMES = (
    "log_metric",
    "log_metrics",
    "log_param",
    "log_params",
    "set_tag",
    "set_tags",
    "delete_tag",
    "end_run",
    "flush_async_logging",
)
ORIGINALS: dict[str, Any] = {name: routing.real(getattr(_fluent, name)) for name in NAMES}

logger = logging.getLogger("asynctrack")
_FINISHED = RunStatus.to_string(RunStatus.FINISHED)
_active = private.active_entity
_model_id = private.active_model_id
_sink_of = routing.sink_of_run
_after = routing.after
_refuse = routing.refuse


def _fast_run() -> tuple[Any, sink.RunSink | None]:
    """The active run (started if there is none, as MLflow does) and its sink, or None
    when MLflow's own path must serve it."""
    entity = _active() or private.get_or_start_run()
    outputs = entity.outputs
    if (outputs is not None and outputs.model_outputs) or _model_id() is not None:
        return entity, None  # metrics then carry model ids: MLflow's path links them
    return entity, _sink_of(entity.info.run_id)


def log_metric(
    key: str,
    value: float,
    step: int | None = None,
    synchronous: bool | None = None,
    timestamp: int | None = None,
    run_id: str | None = None,
    model_id: str | None = None,
    dataset: Any = None,
) -> Any:
    if run_id is None and model_id is None and dataset is None:
        entity = _active()
        if entity is not None:
            outputs = entity.outputs
            if (outputs is None or not outputs.model_outputs) and _model_id() is None:
                s = _sink_of(entity.info.run_id)
                if s is not None:
                    try:
                        s.metric(key, value, timestamp, step or 0)
                    except MlflowException as exc:
                        return _refuse(synchronous, exc)
                    return _after(s, synchronous, None)
    return ORIGINALS["log_metric"](
        key, value, step, synchronous, timestamp, run_id, model_id, dataset
    )


def log_metrics(
    metrics: dict[str, float],
    step: int | None = None,
    synchronous: bool | None = None,
    run_id: str | None = None,
    timestamp: int | None = None,
    model_id: str | None = None,
    dataset: Any = None,
) -> Any:
    if run_id is None and model_id is None and dataset is None:
        _, s = _fast_run()
        if s is not None:
            at = step or 0
            try:
                s.batch([(key, value, timestamp, at) for key, value in metrics.items()])
            except MlflowException as exc:
                return _refuse(synchronous, exc)
            return _after(s, synchronous, None)
    return ORIGINALS["log_metrics"](
        metrics, step, synchronous, run_id, timestamp, model_id, dataset
    )


def log_param(key: str, value: Any, synchronous: bool | None = None) -> Any:
    s = _sink_of(private.get_or_start_run().info.run_id)
    if s is None:
        return ORIGINALS["log_param"](key, value, synchronous)
    try:
        s.batch(params=[(key, value)])
    except MlflowException as exc:
        return _refuse(synchronous, exc)
    return _after(s, synchronous, value)


def log_params(
    params: dict[str, Any], synchronous: bool | None = None, run_id: str | None = None
) -> Any:
    s = _sink_of(run_id or private.get_or_start_run().info.run_id)
    if s is None:
        return ORIGINALS["log_params"](params, synchronous, run_id)
    try:
        s.batch(params=list(params.items()))
    except MlflowException as exc:
        return _refuse(synchronous, exc)
    return _after(s, synchronous, None)


def set_tag(key: str, value: Any, synchronous: bool | None = None) -> Any:
    s = _sink_of(private.get_or_start_run().info.run_id)
    if s is None:
        return ORIGINALS["set_tag"](key, value, synchronous)
    try:
        s.batch(tags=[(key, value)])
    except MlflowException as exc:
        return _refuse(synchronous, exc)
    return _after(s, synchronous, None)


def set_tags(tags: dict[str, Any], synchronous: bool | None = None) -> Any:
    s = _sink_of(private.get_or_start_run().info.run_id)
    if s is None:
        return ORIGINALS["set_tags"](tags, synchronous)
    try:
        s.batch(tags=list(tags.items()))
    except MlflowException as exc:
        return _refuse(synchronous, exc)
    return _after(s, synchronous, None)


def delete_tag(key: str) -> None:
    s = _sink_of(private.get_or_start_run().info.run_id)
    if s is not None:
        s.flush(report=False)  # ordered after the tags queued before it
    ORIGINALS["delete_tag"](key)


def end_run(status: str = _FINISHED) -> None:
    """MLflow's ``end_run``, with the run's end queued behind its events (a barrier)."""
    entity = mlflow.active_run()  # MLflow's accessor: a test suite may have wrapped it
    if entity is None:
        return
    run_id = entity.info.run_id
    s = _sink_of(run_id)
    if s is None:
        ORIGINALS["end_run"](status)
        return
    MLFLOW_RUN_ID.unset()
    private.pop_active_run()
    private.set_last_active_run_id(run_id)
    try:
        if status == _FINISHED:
            s.end(status)
        else:  # leaving a failing block: report delivery problems without masking its error
            try:
                s.end(status)
            except Exception as exc:
                logger.warning("asynctrack: while ending run %s: %s", run_id, exc)
        routing.print_run_url(s)
    finally:
        monitor = private.pop_system_metrics_monitor(run_id)
        if monitor is not None:
            monitor.finish()


def flush_async_logging() -> None:
    """Our flush (every server this process logs to), then MLflow's own queue's."""
    sink.flush_all()
    ORIGINALS["flush_async_logging"]()
