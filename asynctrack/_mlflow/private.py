"""Every private MLflow name the patch touches, in one place.

MLflow does not promise these across releases; ``tests/test_mlflow_patch.py`` checks each
one exists with the shape used here, so an MLflow upgrade that moves one fails that test
instead of a user's training run.
"""

from __future__ import annotations

import os
from typing import Any

from mlflow.tracking import fluent as _fluent
from mlflow.tracking._tracking_service.client import TrackingServiceClient

#: (module or class, attribute) pairs used below, checked by the test.
NAMES: tuple[tuple[Any, str], ...] = (
    (_fluent, "_active_run_stack"),
    (_fluent, "_last_active_run_id"),
    (_fluent, "_ACTIVE_MODEL_CONTEXT"),
    (_fluent, "_get_or_start_run"),
    (_fluent, "run_id_to_system_metrics_monitor"),
    (TrackingServiceClient, "_log_url"),
)


_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def active_entity() -> Any:
    """MLflow's active run of this thread (or task, under asynctrack's run stack), or None.

    The hot path: MLflow's ``ThreadLocalVariable.get`` asks the OS for the pid on every
    call (to reset after fork); reading its slot and comparing with a pid kept up to date
    by an at-fork hook costs a third of that. The stack object is read each call:
    asynctrack's run layer may swap in its own (which has no such slot), and a ``get``
    wrapped on the object itself (``mock.patch``) is honoured.
    """
    holder = _fluent._active_run_stack
    if "get" in holder.__dict__:  # wrapped by a test suite or a plugin: ask it
        stack = holder.get()
    else:
        try:
            stack, pid = holder.thread_local.value
        except AttributeError:
            stack = holder.get()
        else:
            if pid != _pid:
                stack = holder.get()
    return stack[-1] if stack else None


def get_or_start_run() -> Any:
    """The active run, started as ``mlflow.log_metric`` starts one when there is none."""
    return _fluent._get_or_start_run()


def pop_active_run() -> Any:
    """Take the innermost active run off MLflow's stack (``mlflow.end_run``'s first step)."""
    stack = _fluent._active_run_stack.get()
    return stack.pop() if stack else None


def set_last_active_run_id(run_id: str) -> None:
    _fluent._last_active_run_id.set(run_id)


# Whether any thread may have an active model (``mlflow.set_active_model``, or MLflow
# while it logs a model): until then the hot path skips the thread-local lookup.
_models_in_use = False


def active_model_id() -> str | None:
    """``mlflow.set_active_model``'s model in this thread: metrics then carry a model id."""
    if not _models_in_use:
        return None
    model_id: str | None = _fluent._ACTIVE_MODEL_CONTEXT.get().model_id
    return model_id


def watch_active_models() -> None:
    """Notice the first active model set in any thread (wraps the context's ``set``)."""
    global _models_in_use
    context: Any = _fluent._ACTIVE_MODEL_CONTEXT
    if "set" in vars(context):
        return
    original = context.set

    def set_and_note(value: Any) -> None:
        global _models_in_use
        if getattr(value, "model_id", None) is not None:
            _models_in_use = True
        original(value)

    context.set = set_and_note
    values = context.get_all_thread_values().values()
    _models_in_use = any(getattr(v, "model_id", None) is not None for v in values)
    _models_in_use = _models_in_use or context.get().model_id is not None


def unwatch_active_models() -> None:
    global _models_in_use
    vars(_fluent._ACTIVE_MODEL_CONTEXT).pop("set", None)
    _models_in_use = True  # no longer watched: always look


def pop_system_metrics_monitor(run_id: str) -> Any:
    return _fluent.run_id_to_system_metrics_monitor.pop(run_id, None)


def print_run_url(client: Any, run_id: str) -> None:
    """The "View run ... at: URL" line MLflow prints when a run ends (REST stores only)."""
    client._tracking_client._log_url(run_id)
