"""Run trackers: ``MLflowExperimentTracker`` and ``NestedRunTracker``.

Logging calls check what is cheap, queue the event and return; the engine's worker sends
it. Run creation and run end talk to the server: in ``async with`` blocks they run in a
worker thread, so the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from asynctrack import _runs
from asynctrack._artifacts.methods import ArtifactMethods
from asynctrack._engine import Engine, get_engine
from asynctrack._engine.events import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MetaEvent,
    _checked_keys,
    check_key,
    check_step,
    check_text_value,
    check_timestamp,
    check_value,
)
from asynctrack._engine.stats import Stats
from asynctrack._runs import FixedRun, Run, RunSource, TrackerRuns
from asynctrack.errors import NoActiveRunError, ParamConflictError

__all__ = ["MLflowExperimentTracker", "NestedRunTracker"]

logger = logging.getLogger("asynctrack")


class _RunMethods(ArtifactMethods):
    """The logging methods, for the run ``_run_var`` gives (else ``_active()``): shared by
    trackers, whose run depends on the thread or task, and :class:`RunLogger`."""

    _run_var: RunSource

    def _active(self) -> Run:
        raise NoActiveRunError("no active run")

    # ------------------------------------------------------------------ the hot path

    def log_metric(
        self, key: str, value: float, step: int | None = None, timestamp: int | None = None
    ) -> None:
        run = self._run_var.get() or self._active()
        try:
            if key not in _checked_keys:
                check_key(key, "metric")
        except TypeError:  # an unhashable key: check_key names it
            check_key(key, "metric")
        if type(value) is not float:
            value = check_value(key, value)
        if step is None:
            step = 0
        elif type(step) is not int or not -9223372036854775808 <= step <= 9223372036854775807:
            step = check_step(key, step)
        # Seconds as a float, or the caller's own integer milliseconds (see events.py).
        when = time.time() if timestamp is None else check_timestamp(key, timestamp)
        event = (run.run_id, key, value, when, step)
        run.put(event)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        """Log several metrics at one timestamp; invalid ones are named, the rest are logged."""
        run = self._run_var.get() or self._active()
        when: float | int = time.time() if timestamp is None else check_timestamp("*", timestamp)
        put = run.put
        step = 0 if step is None else check_step("<step>", step)
        errors: list[Exception] = []
        for key, value in metrics.items():
            try:
                check_key(key, "metric")
                if type(value) is not float:
                    value = check_value(key, value)
            except (TypeError, ValueError, OverflowError) as exc:
                errors.append(exc)
                continue
            put((run.run_id, key, value, when, step))
        if errors:
            _raise_collected(errors)

    def log_param(self, key: str, value: Any) -> None:
        run = self._run_var.get() or self._active()
        check_key(key, "param")
        text = check_text_value("param", key, value, MAX_PARAM_VALUE_LENGTH)
        before = run.params.get(key)
        if before is None:
            run.params[key] = text
            run.put(MetaEvent("param", run.run_id, key, text))
        elif before != text:
            raise ParamConflictError(
                f"param {key!r} of run {run.run_id} is already {before!r}; MLflow does not "
                f"allow changing it to {text!r}"
            )

    def log_params(self, params: Mapping[str, Any]) -> None:
        errors: list[Exception] = []
        for key, value in params.items():
            try:
                self.log_param(key, value)
            except (TypeError, ValueError) as exc:
                errors.append(exc)
        if errors:
            _raise_collected(errors)

    def set_tag(self, key: str, value: Any) -> None:
        run = self._run_var.get() or self._active()
        check_key(key, "tag")
        text = check_text_value("tag", key, value, MAX_TAG_VALUE_LENGTH)
        run.put(MetaEvent("tag", run.run_id, key, text))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        errors: list[Exception] = []
        for key, value in tags.items():
            try:
                self.set_tag(key, value)
            except (TypeError, ValueError) as exc:
                errors.append(exc)
        if errors:
            _raise_collected(errors)


class MLflowExperimentTracker(_RunMethods):
    """Logs to runs of one experiment; also a context manager that starts a run.

    ``with tracker.start_run(run_name=...):`` or ``with MLflowExperimentTracker(...) as t:``
    (and their ``async with`` forms) create the run, make it the active run of the current
    thread or task (and MLflow's, for fluent ``mlflow.log_*`` calls), and at the end store
    every queued event, then set the status: FINISHED, FAILED when an exception escaped,
    KILLED on ``KeyboardInterrupt``.
    """

    def __init__(
        self,
        experiment_name: str | None = None,
        tracking_uri: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self._experiment_name = experiment_name
        self._tracking_uri = tracking_uri
        self._run_name = run_name
        self._tags = dict(tags or {})
        # Per tracker and per context: two tasks sharing a tracker log to their own runs.
        self._runs = TrackerRuns(f"asynctrack_run_{id(self)}")
        self._run_var = self._runs.var
        self._scopes: contextvars.ContextVar[tuple[_RunScope, ...]] = contextvars.ContextVar(
            f"asynctrack_scopes_{id(self)}", default=()
        )

    def __repr__(self) -> str:
        run = self._runs.current()
        return (
            f"{type(self).__name__}(experiment_name={self._experiment_name!r}, "
            f"run_id={run.run_id if run else None!r})"
        )

    # ------------------------------------------------------------------ runs

    def start_run(
        self, run_name: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> _RunScope:
        """A context manager (``with`` or ``async with``) for a new run of this experiment."""
        return _RunScope(self, run_name, dict(tags or {}))

    def _parent(self) -> Run | None:
        return None

    def _push_scope(self) -> _RunScope:
        scope = self.start_run(self._run_name, self._tags)
        self._scopes.set((*self._scopes.get(), scope))
        return scope

    def _pop_scope(self) -> _RunScope:
        scopes = self._scopes.get()
        self._scopes.set(scopes[:-1])
        return scopes[-1]

    def __enter__(self) -> MLflowExperimentTracker:
        try:
            self._push_scope().__enter__()
        except BaseException:
            self._pop_scope()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pop_scope().__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> MLflowExperimentTracker:
        try:
            await self._push_scope().__aenter__()
        except BaseException:
            self._pop_scope()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._pop_scope().__aexit__(exc_type, exc, tb)

    def _active(self) -> Run:
        return self._runs.active(type(self).__name__)

    @property
    def run_id(self) -> str | None:
        """The active run's id (after the run ended: the last run's id)."""
        run = self._runs.current()
        return run.run_id if run else None

    @property
    def experiment_id(self) -> str | None:
        run = self._runs.current()
        return run.experiment_id if run else None

    @property
    def artifact_uri(self) -> str | None:
        run = self._runs.current()
        return run.artifact_uri if run else None

    # ------------------------------------------------------------------ delivery

    def flush(self, timeout: float | None = None) -> None:
        """Return once everything logged to this tracker's server is stored.

        Raises :class:`~asynctrack.errors.FlushTimeoutError` at the deadline (``None``: the
        configured ``flush_timeout``) and :class:`~asynctrack.errors.DeliveryError` naming
        the events the server refused since the last flush.
        """
        self._engine().flush(timeout)

    async def aflush(self, timeout: float | None = None) -> None:
        """:meth:`flush` without blocking the event loop."""
        await anyio.to_thread.run_sync(self.flush, timeout, abandon_on_cancel=True)

    def stats(self) -> Stats:
        return self._engine().stats()

    def _engine(self) -> Engine:
        run = self._runs.current()
        if run is not None:
            return run.engine
        return get_engine(_runs.resolve_tracking_uri(self._tracking_uri))


class NestedRunTracker(MLflowExperimentTracker):
    """A child run of the run active in the current thread or task (cross-validation folds,
    grid-search points). Entering it with no active run raises NoActiveRunError."""

    def __init__(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> None:
        super().__init__(run_name=run_name, tags=tags)

    def _parent(self) -> Run | None:
        parent = _runs.current_run.get()
        if parent is None:
            raise NoActiveRunError("NestedRunTracker needs a parent: enter it inside an active run")
        return parent


class RunLogger(_RunMethods):
    """The logging methods, bound to one run (used by the decorators)."""

    def __init__(self, run: Run) -> None:
        self._run_var = FixedRun(run)
        self.run = run

    def flush(self, timeout: float | None = None) -> None:
        self.run.engine.flush(timeout)


class _RunScope:
    """One run's lifetime, as a sync or async context manager."""

    def __init__(
        self,
        tracker: MLflowExperimentTracker,
        run_name: str | None,
        tags: dict[str, Any],
        nested: bool = False,
    ) -> None:
        self._tracker = tracker
        self._run_name = run_name
        self._tags = tags
        self._nested = nested
        self._run: Run | None = None
        self._tokens: tuple[contextvars.Token[Run | None], ...] = ()

    @property
    def run(self) -> Run:
        assert self._run is not None, "the run scope was not entered"
        return self._run

    def _parent(self) -> Run | None:
        return _runs.current_run.get() if self._nested else self._tracker._parent()

    def _create(self, parent: Run | None) -> Run:
        tracker = self._tracker
        return _runs.create_run(
            _runs.resolve_tracking_uri(tracker._tracking_uri),
            tracker._experiment_name,
            self._run_name,
            self._tags,
            parent,
        )

    def _activate(self, run: Run) -> MLflowExperimentTracker:
        self._run = run
        self._tokens = self._tracker._runs.enter(run)
        return self._tracker

    def deactivate(self, exc_type: type[BaseException] | None) -> str:
        """Leave the run's context (it stays open on the server); return its final status."""
        self._tracker._runs.leave(self.run, self._tokens)
        return self.status_of(exc_type)

    @staticmethod
    def status_of(exc: type[BaseException] | BaseException | None) -> str:
        """FINISHED, KILLED for Ctrl-C or a cancelled task, FAILED for any other error."""
        if exc is None:
            return "FINISHED"
        exc_type = exc if isinstance(exc, type) else type(exc)
        killed = issubclass(exc_type, (KeyboardInterrupt, asyncio.CancelledError))
        return "KILLED" if killed else "FAILED"

    def finish(self, status: str, error: BaseException | None) -> None:
        _finish(self.run, status, failing=error is not None)

    async def afinish(self, status: str, error: BaseException | None) -> None:
        # Shielded: in a cancelled scope the run must still end (anyio cancellation is
        # level-triggered, so an unshielded await would raise before the run ends).
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_finish, self.run, status, error is not None)

    def __enter__(self) -> MLflowExperimentTracker:
        return self._activate(self._create(self._parent()))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(self.deactivate(exc_type), exc)

    async def __aenter__(self) -> MLflowExperimentTracker:
        parent = self._parent()
        # Shielded: a run created on the server must be handed to its block, whose exit
        # ends it, even if the task is cancelled meanwhile.
        with anyio.CancelScope(shield=True):
            run = await anyio.to_thread.run_sync(self._create, parent)
        tracker = self._activate(run)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException as exc:
            await self.afinish(self.deactivate(type(exc)), exc)
            raise
        return tracker

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.afinish(self.deactivate(exc_type), exc)


def _finish(run: Run, status: str, failing: bool) -> None:
    """End a run; while an exception is escaping, report delivery problems without masking it."""
    _runs.open_runs.pop(run.run_id, None)
    if not run.owned():
        # A forked child leaving its parent's run block: store what the child logged, but
        # the run, its status and end time stay the parent's.
        try:
            run.engine.flush(run_id=run.run_id)
        except Exception as exc:
            logger.warning("asynctrack: while leaving run %s in a child: %s", run.run_id, exc)
        return
    if not failing:
        run.engine.end_run(run.run_id, status)
        return
    try:
        run.engine.end_run(run.run_id, status)
    except Exception as exc:
        logger.warning("asynctrack: while ending run %s: %s", run.run_id, exc)


def _raise_collected(errors: list[Exception]) -> None:
    if len(errors) == 1:
        raise errors[0]
    message = "; ".join(str(e) for e in errors)
    raise type(errors[0])(f"{len(errors)} invalid entries: {message}")
