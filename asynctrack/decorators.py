"""Decorators: ``mlflow_run``, ``log_params_decorator``, ``log_metrics_decorator``,
``timed_execution``.

Each works on plain and ``async def`` functions and keeps the signature, the return value
and the exceptions. They compose in any order: when a decorator that logs sits *outside*
``@mlflow_run`` (so no run exists yet when it is called), it joins a call scope, and the
run that ``@mlflow_run`` starts stays open until the outermost decorator has logged too.

``log_params_decorator`` logs the call's bound arguments by name, defaults included, and
entries of ``**kwargs``; only scalars (str, numbers, bools, None) are logged: lists,
arrays, data frames and other objects are skipped, since a param is one short string.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import numbers
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

from asynctrack import _runs
from asynctrack._runs import Run
from asynctrack.errors import NoActiveRunError
from asynctrack.tracker import MLflowExperimentTracker, RunLogger, _RunScope

__all__ = [
    "log_artifact_decorator",
    "log_metrics_decorator",
    "log_params_decorator",
    "mlflow_run",
    "timed_execution",
]

P = ParamSpec("P")
R = TypeVar("R")

_STARTS_RUN = "__asynctrack_starts_run__"


@dataclass
class _CallScope:
    """Decorators outside ``@mlflow_run`` share one of these for a call."""

    run: Run | None = None
    deferred: list[Callable[[RunLogger], None]] = field(default_factory=list)
    finish: Callable[[BaseException | None], Awaitable[None] | None] | None = None


_call_scope: contextvars.ContextVar[_CallScope | None] = contextvars.ContextVar(
    "asynctrack_call_scope", default=None
)


def _starts_run(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, _STARTS_RUN, False))


def _active_logger(fn: Callable[..., Any]) -> RunLogger:
    """The run a decorator on ``fn`` (which starts no run of its own) logs to."""
    run = _runs.current_run.get() or _runs.fluent_run()
    if run is None:
        raise NoActiveRunError(
            f"{getattr(fn, '__qualname__', fn)!r} logs to MLflow but no run is active: call it "
            "inside a tracker run, or decorate it with @mlflow_run"
        )
    return RunLogger(run)


# ---------------------------------------------------------------------- one call plan


class _Plan:
    """What a decorator does around one call: ``start`` before it, ``returned`` with its
    result, ``finish`` after it, always, even if ``start`` failed (with the exception
    escaping, if any). A step may return an awaitable: the async runner awaits it; plans of
    sync functions return none."""

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Awaitable[None] | None:
        return None

    def returned(self, result: Any, elapsed: float) -> None:
        return None

    def finish(self, error: BaseException | None) -> Awaitable[None] | None:
        return None


def _run_with(fn: Callable[P, R], plan: Callable[[], _Plan], starts_run: bool) -> Callable[P, R]:
    """``fn`` wrapped so each call follows a fresh plan; plain and ``async def`` alike."""
    if inspect.iscoroutinefunction(fn):
        afn = cast(Callable[P, Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def async_runner(*args: P.args, **kwargs: P.kwargs) -> Any:
            steps, error = plan(), None
            try:
                await _maybe(steps.start(args, kwargs))
                start = time.perf_counter()
                result = await afn(*args, **kwargs)
                steps.returned(result, time.perf_counter() - start)
                return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                await _maybe(steps.finish(error))

        wrapper: Any = async_runner
    else:

        @functools.wraps(fn)
        def sync_runner(*args: P.args, **kwargs: P.kwargs) -> Any:
            steps, error = plan(), None
            try:
                steps.start(args, kwargs)
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                steps.returned(result, time.perf_counter() - start)
                return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                steps.finish(error)

        wrapper = sync_runner
    setattr(wrapper, _STARTS_RUN, starts_run)
    return cast(Callable[P, R], wrapper)


async def _maybe(step: Awaitable[None] | None) -> None:
    if step is not None:
        await step


class _LoggingPlan(_Plan):
    """``before`` logs ahead of the call, ``after`` logs its result.

    Above an ``@mlflow_run`` (``fn`` starts a run), both log to *that* run, whatever run is
    active around the call: the decorators of one function share a call scope, which the
    run fills once it starts and which ends it once the outermost decorator is done.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        before: Callable[[RunLogger, tuple[Any, ...], dict[str, Any]], None] | None,
        after: Callable[[RunLogger, Any, float], None] | None,
    ) -> None:
        self._fn, self._before, self._after = fn, before, after
        self._scope: _CallScope | None = None
        self._owned: contextvars.Token[_CallScope | None] | None = None

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        before = self._before
        if not _starts_run(self._fn):
            if before is not None:
                before(_active_logger(self._fn), args, kwargs)
            return
        scope = _call_scope.get()
        if scope is None or scope.run is not None:  # the outermost decorator of this call
            scope = _CallScope()
            self._owned = _call_scope.set(scope)
        self._scope = scope
        if before is not None:
            scope.deferred.append(lambda logger: before(logger, args, kwargs))

    def returned(self, result: Any, elapsed: float) -> None:
        if self._after is None:
            return
        scope = self._scope
        if scope is None:
            self._after(_active_logger(self._fn), result, elapsed)
        elif scope.run is None:
            raise NoActiveRunError(
                f"{self._fn.__qualname__!r}: the run it logs to was never started"
            )
        else:
            self._after(RunLogger(scope.run), result, elapsed)

    def finish(self, error: BaseException | None) -> Awaitable[None] | None:
        if self._owned is None or self._scope is None:
            return None
        _call_scope.reset(self._owned)
        return self._scope.finish(error) if self._scope.finish is not None else None


def _logging_decorator(
    fn: Callable[P, R],
    before: Callable[[RunLogger, tuple[Any, ...], dict[str, Any]], None] | None,
    after: Callable[[RunLogger, Any, float], None] | None,
) -> Callable[P, R]:
    return _run_with(fn, lambda: _LoggingPlan(fn, before, after), _starts_run(fn))


# ---------------------------------------------------------------------- mlflow_run


class _RunPlan(_Plan):
    """A new run around the call (a child of the active run, if any), its duration logged.

    When decorators that log sit outside it, they joined a call scope: the run fills it,
    and the outermost of them ends the run once they have logged too."""

    def __init__(
        self, experiment_name: str, run_name: str | None, tags: dict[str, Any], is_async: bool
    ) -> None:
        self._is_async = is_async
        tracker = MLflowExperimentTracker(experiment_name)
        self._scope = _RunScope(tracker, run_name, tags, nested=True)
        call = _call_scope.get()
        self._call = call if call is not None and call.run is None else None
        self._start = 0.0
        self._entered = False

    def start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Awaitable[None] | None:
        if self._is_async:
            return self._astart()
        self._scope.__enter__()
        self._entered = True
        self._adopt()
        return None

    async def _astart(self) -> None:
        await self._scope.__aenter__()
        self._entered = True
        self._adopt()

    def _adopt(self) -> None:
        self._start = time.perf_counter()
        call = self._call
        if call is not None:
            call.run = run = self._scope.run
            logger = RunLogger(run)
            for action in call.deferred:
                action(logger)

    def finish(self, error: BaseException | None) -> Awaitable[None] | None:
        if not self._entered:  # the run was never created: nothing to end
            return None
        scope = self._scope
        RunLogger(scope.run).log_metric("duration_seconds", time.perf_counter() - self._start)
        status = scope.deactivate(type(error) if error else None)
        end = scope.afinish if self._is_async else scope.finish
        if self._call is None:
            return end(status, error)

        def end_after_outer(outer: BaseException | None) -> Awaitable[None] | None:
            return end(_RunScope.status_of(outer) if outer else status, outer or error)

        self._call.finish = end_after_outer
        return None


def mlflow_run(
    experiment_name: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the function inside a new run of ``experiment_name`` and log its duration as
    ``duration_seconds``. Inside an active run, the new run is its child."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        is_async = inspect.iscoroutinefunction(fn)

        def plan() -> _Plan:
            return _RunPlan(experiment_name, run_name, dict(tags or {}), is_async)

        return _run_with(fn, plan, starts_run=True)

    return decorate


# ---------------------------------------------------------------------- the others


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number))


def _bound_params(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    signature = inspect.signature(fn)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    params: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            params.update({k: v for k, v in value.items() if _is_scalar(v)})
        elif kind is not inspect.Parameter.VAR_POSITIONAL and _is_scalar(value):
            params[name] = value
    return params


def log_params_decorator(fn: Callable[P, R]) -> Callable[P, R]:
    """Log the function's scalar arguments (defaults included) as params of the active run."""

    def before(logger: RunLogger, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        logger.log_params(_bound_params(fn, args, kwargs))

    return _logging_decorator(fn, before, None)


def log_metrics_decorator(keys: Iterable[str]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Log the given keys of the dict the function returns as metrics of the active run.

    A key missing from the result gets a warning naming it; a result that is not a dict
    raises ``TypeError`` (after the function ran).
    """
    wanted = list(keys)
    if isinstance(keys, str):
        raise TypeError("log_metrics_decorator takes a list of keys, not a string")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        def after(logger: RunLogger, result: Any, elapsed: float) -> None:
            if not isinstance(result, Mapping):
                raise TypeError(
                    f"{fn.__qualname__} must return a dict for log_metrics_decorator, "
                    f"got {type(result).__name__}"
                )
            missing = [k for k in wanted if k not in result]
            if missing:
                warnings.warn(
                    f"{fn.__qualname__} returned no {', '.join(map(repr, missing))}: not logged",
                    stacklevel=4,
                )
            logger.log_metrics({k: result[k] for k in wanted if k in result})

        return _logging_decorator(fn, None, after)

    return decorate


def timed_execution(fn: Callable[P, R]) -> Callable[P, R]:
    """Log the call's wall time as metric ``<function name>_duration_seconds``."""
    key = f"{fn.__name__}_duration_seconds"

    def after(logger: RunLogger, result: Any, elapsed: float) -> None:
        logger.log_metric(key, elapsed)

    return _logging_decorator(fn, None, after)


def log_artifact_decorator(
    artifact_path: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Log the file (or folder) at the path the function returns, under ``artifact_path``,
    to the active run; plain and ``async def`` functions alike.

    The file is captured when the function returns, so it may be overwritten at once. A
    result that is not a path raises ``TypeError``, a path to nothing ``FileNotFoundError``,
    both after the function ran; the return value is passed through unchanged.
    """
    if callable(artifact_path):
        raise TypeError(
            "use @log_artifact_decorator() or @log_artifact_decorator(artifact_path=...)"
        )

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        def after(logger: RunLogger, result: Any, elapsed: float) -> None:
            if not isinstance(result, (str, os.PathLike)):
                raise TypeError(
                    f"{fn.__qualname__} must return a file path for log_artifact_decorator, "
                    f"got {type(result).__name__}"
                )
            if os.path.isdir(result):
                logger.log_artifacts(result, artifact_path)
            else:
                logger.log_artifact(result, artifact_path)

        return _logging_decorator(fn, None, after)

    return decorate
