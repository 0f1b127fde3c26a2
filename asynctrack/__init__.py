"""asynctrack: MLflow tracking that costs the training loop nothing.

Logging calls queue events and return; one background worker batches them into
``log_batch`` calls. See README.md for a quick start.
"""

from __future__ import annotations

from asynctrack import config
from asynctrack._artifacts.models import LoggedModelHandle
from asynctrack._engine import configure
from asynctrack._engine.runtime import configure_engine
from asynctrack._engine.stats import Stats
from asynctrack._mlflow import patch_mlflow, unpatch_mlflow
from asynctrack.api import aflush, flush, stats
from asynctrack.config import setup_mlflow_env
from asynctrack.decorators import (
    log_artifact_decorator,
    log_metrics_decorator,
    log_params_decorator,
    mlflow_run,
    timed_execution,
)
from asynctrack.errors import (
    AccessDeniedError,
    AsyncTrackError,
    ConfigError,
    DeliveryError,
    EngineClosedError,
    FlushTimeoutError,
    KeptEvents,
    NoActiveRunError,
    ParamConflictError,
    QueueFullError,
    Rejection,
)
from asynctrack.tracker import MLflowExperimentTracker, NestedRunTracker
from asynctrack.utils import (
    compare_runs,
    delete_experiment_runs,
    get_best_run,
    get_experiment_summary,
    get_run_by_name,
    list_registered_models,
    load_best_model,
    register_best_model,
    transition_model_stage,
)

__all__ = (
    "AccessDeniedError",
    "AsyncTrackError",
    "ConfigError",
    "DeliveryError",
    "EngineClosedError",
    "FlushTimeoutError",
    "KeptEvents",
    "LoggedModelHandle",
    "MLflowExperimentTracker",
    "NestedRunTracker",
    "NoActiveRunError",
    "ParamConflictError",
    "QueueFullError",
    "Rejection",
    "Stats",
    "aflush",
    "compare_runs",
    "config",
    "configure",
    "configure_engine",
    "delete_experiment_runs",
    "flush",
    "get_best_run",
    "get_experiment_summary",
    "get_run_by_name",
    "list_registered_models",
    "load_best_model",
    "log_artifact_decorator",
    "log_metrics_decorator",
    "log_params_decorator",
    "mlflow_run",
    "patch_mlflow",
    "register_best_model",
    "setup_mlflow_env",
    "stats",
    "timed_execution",
    "transition_model_stage",
    "unpatch_mlflow",
)
