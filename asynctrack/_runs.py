"""Runs: creating and ending them, and which one is active where.

This module is the one place that knows which run is active where:

- :class:`TrackerRuns`: one tracker's run in each thread or task (a context variable),
  the runs it entered and has not left (for threads that do not inherit the context), and
  its last run (``tracker.run_id`` after the block);
- ``current_run``: the innermost run of any tracker in this thread or task, the parent of
  a ``NestedRunTracker`` and where decorators log;
- ``open_runs``: every run entered and not yet ended in this process, ended at exit;
- MLflow's own active-run stack (``mlflow.active_run()``), kept in step so fluent calls
  inside a tracker run land in that run; :func:`fluent_run` reads it back as a Run.

Context variables, so each thread and each asyncio task sees its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from asynctrack._engine import Engine, get_engine
from asynctrack._engine.events import Event, check_key
from asynctrack._engine.runtime import before_exit

PARENT_RUN_TAG = "mlflow.parentRunId"


@dataclass(eq=False)
class Run:
    """An open run: what the hot path needs, and the MLflow entity it was created as."""

    run_id: str
    experiment_id: str
    tracking_uri: str = field(repr=False)  # may carry user:password@
    artifact_uri: str
    engine: Engine
    entity: Any = field(repr=False)
    # Params already logged, to refuse a changed value at the call (the server refuses the
    # whole request, metrics included, if it sees one).
    params: dict[str, str] = field(default_factory=dict, repr=False)
    #: The process that started the run: only it ends the run (a forked child that leaves
    #: the run's block, say through ``sys.exit``, must not end its parent's run).
    pid: int = field(default_factory=os.getpid, repr=False)

    def __post_init__(self) -> None:
        #: The hot path's door: the engine queue's ``put``, looked up once per run.
        self.put: Callable[[Event], None] = self.engine.queue.put

    def owned(self) -> bool:
        return self.pid == os.getpid()


class RunSource(Protocol):
    """Where a logger finds its run: a tracker's context variable, or one fixed run."""

    def get(self) -> Run | None: ...


class FixedRun:
    """A :class:`RunSource` for a logger bound to one run (the decorators')."""

    __slots__ = ("_run",)

    def __init__(self, run: Run) -> None:
        self._run = run

    def get(self) -> Run:
        return self._run


class TrackerRuns:
    """One tracker's runs (see the module's docstring); :meth:`enter` and :meth:`leave`
    keep every notion of "active" above in step."""

    def __init__(self, name: str) -> None:
        #: Read on the hot path: a ContextVar's ``get`` is a C call.
        self.var: contextvars.ContextVar[Run | None] = contextvars.ContextVar(name, default=None)
        self.last: Run | None = None
        self._open: list[Run] = []

    def current(self) -> Run | None:
        """The active run here, else the last one (after its block)."""
        return self.var.get() or self.last

    def active(self, owner: str) -> Run:
        """The run to log to here; a thread that did not inherit the context gets the
        tracker's only open run. Raises NoActiveRunError naming ``owner`` otherwise."""
        from asynctrack.errors import NoActiveRunError

        run = self.var.get()
        if run is not None:
            return run
        open_now = list(self._open)
        if len(open_now) == 1:  # e.g. a thread started inside the run's block
            return open_now[0]
        if open_now:
            raise NoActiveRunError(
                f"{owner} has {len(open_now)} runs open in other threads or tasks; start "
                "this thread with contextvars.copy_context().run(...) to say which"
            )
        raise NoActiveRunError(
            f"{owner} has no active run here: log inside `with tracker.start_run(...)` "
            "(or `async with`)"
        )

    def enter(self, run: Run) -> tuple[contextvars.Token[Run | None], ...]:
        """Make ``run`` active here, for this tracker, nested trackers, decorators and MLflow."""
        self.last = run
        self._open.append(run)
        open_runs[run.run_id] = run
        push_fluent(run)
        return (self.var.set(run), current_run.set(run))

    def leave(self, run: Run, tokens: tuple[contextvars.Token[Run | None], ...]) -> None:
        """Undo :meth:`enter` here (the run stays open on the server until it ends)."""
        own, current = tokens
        with contextlib.suppress(ValueError):
            self._open.remove(run)
        self.var.reset(own)
        current_run.reset(current)
        pop_fluent(run)


#: The innermost run active in this thread or task: the parent of a NestedRunTracker, and
#: where decorators log.
current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar(
    "asynctrack_current_run", default=None
)

#: Runs entered and not yet ended, by id: interpreter exit ends them as MLflow would.
open_runs: dict[str, Run] = {}

_experiment_ids: dict[tuple[str, str], str] = {}
_experiment_lock = threading.Lock()


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    if tracking_uri:
        return tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


def experiment_id_for(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating the experiment if it does not exist yet."""
    key = (tracking_uri, name)
    with _experiment_lock:
        if key in _experiment_ids:
            return _experiment_ids[key]
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name)
        except MlflowException as exc:  # created meanwhile by another process
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
            experiment_id = existing.experiment_id
    elif experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"experiment {name!r} is deleted; restore it or choose another experiment name"
        )
    else:
        experiment_id = experiment.experiment_id
    with _experiment_lock:
        _experiment_ids[key] = experiment_id
    return experiment_id


def create_run(
    tracking_uri: str,
    experiment_name: str | None,
    run_name: str | None,
    tags: dict[str, Any] | None,
    parent: Run | None,
) -> Run:
    """Create a run as ``mlflow.start_run`` would (same default tags). Blocking I/O."""
    from mlflow import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    for key in tags or {}:
        check_key(key, "tag")
    if parent is not None:
        experiment_id = parent.experiment_id
        tracking_uri = parent.tracking_uri
    else:
        name = experiment_name or default_experiment_name()
        experiment_id = experiment_id_for(tracking_uri, name)
    user_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent is not None:
        user_tags[PARENT_RUN_TAG] = parent.run_id
    client = MlflowClient(tracking_uri=tracking_uri)
    entity = client.create_run(experiment_id, tags=resolve_tags(user_tags), run_name=run_name)
    return Run(
        run_id=entity.info.run_id,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        artifact_uri=entity.info.artifact_uri,
        engine=get_engine(tracking_uri),
        entity=entity,
    )


def default_experiment_name() -> str:
    """``MLFLOW_EXPERIMENT_NAME`` as it is now, else the seed's default."""
    from asynctrack import config

    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.MLFLOW_EXPERIMENT_NAME


class _ContextRunStack:
    """MLflow's active-run stack, per thread *and per asyncio task*.

    MLflow keeps it in a thread-local, so two tasks of one event loop would share it and a
    fluent ``mlflow.log_metric`` in one task could land in the other task's run. This
    drop-in (same ``get``/``set``/``get_all_thread_values``) keeps a stack per context: a
    task starts from a copy of its creator's stack and never changes the creator's.
    """

    def __init__(self, thread_local: Any) -> None:
        self._thread_local = thread_local
        self._var: contextvars.ContextVar[tuple[object, list[Any]]] = contextvars.ContextVar(
            "asynctrack_mlflow_run_stack"
        )
        self._stacks: dict[object, list[Any]] = {}

    @staticmethod
    def _owner() -> object:
        import asyncio

        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop in this thread
            task = None
        return (threading.get_ident(), id(task) if task is not None else None)

    def get(self) -> list[Any]:
        owner = self._owner()
        held = self._var.get(None)
        if held is not None and held[0] == owner:
            return held[1]
        # A new task copies its creator's stack; a fresh context starts from the runs this
        # thread started before asynctrack took over.
        stack = list(held[1]) if held is not None else list(self._thread_local.get())
        self.set(stack, owner)
        return stack

    def set(self, value: list[Any], owner: object = None) -> None:
        owner = owner or self._owner()
        self._var.set((owner, value))
        self._stacks[owner] = value
        for key in [k for k, v in self._stacks.items() if not v and k != owner]:
            del self._stacks[key]  # forget contexts with nothing active

    def get_all_thread_values(self) -> dict[object, list[Any]]:
        return dict(self._stacks)


_stack_lock = threading.Lock()


def _fluent_stack() -> Any:
    from mlflow.tracking import fluent

    with _stack_lock:
        if not isinstance(fluent._active_run_stack, _ContextRunStack):
            fluent._active_run_stack = _ContextRunStack(fluent._active_run_stack)  # type: ignore[assignment]
    return fluent._active_run_stack


def push_fluent(run: Run) -> None:
    """Make ``run`` MLflow's active run in this thread or task (no I/O: the entity is at
    hand)."""
    from mlflow.tracking import fluent

    _fluent_stack().get().append(fluent.ActiveRun(run.entity))


def pop_fluent(run: Run) -> None:
    from mlflow.tracking import fluent

    stack = _fluent_stack().get()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i].info.run_id == run.run_id:
            del stack[i]
            break
    fluent._last_active_run_id.set(run.run_id)


_fluent_runs: dict[str, Run] = {}


def fluent_run() -> Run | None:
    """MLflow's active run in this thread (``mlflow.start_run()``), as an asynctrack Run."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if not stack:
        return None
    entity = stack[-1]
    run = _fluent_runs.get(entity.info.run_id)
    if run is None:
        tracking_uri = resolve_tracking_uri(None)
        run = Run(
            run_id=entity.info.run_id,
            experiment_id=entity.info.experiment_id,
            tracking_uri=tracking_uri,
            artifact_uri=entity.info.artifact_uri,
            engine=get_engine(tracking_uri),
            entity=entity,
        )
        if len(_fluent_runs) > 1000:
            _fluent_runs.clear()
        _fluent_runs[entity.info.run_id] = run
    return run


def end_open_runs() -> None:
    """At interpreter exit: queue the end of every run still open (FINISHED, or FAILED when
    an uncaught exception is ending the program) and take them off MLflow's stack, so
    MLflow's own exit hook does not end them with blocking, retried calls."""
    import sys

    from asynctrack._engine.events import end_event

    status = "FAILED" if getattr(sys, "last_value", None) is not None else "FINISHED"
    for run in list(open_runs.values()):
        if not run.owned():
            continue  # a forked child's copy of its parent's run
        open_runs.pop(run.run_id, None)
        pop_fluent(run)
        with contextlib.suppress(Exception):  # an engine already closed: nothing to do
            run.engine.put(end_event(run.run_id, status))


before_exit.append(end_open_runs)
