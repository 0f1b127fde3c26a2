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


def _logging_decorator(
    fn: Callable[P, R],
    before: Callable[[RunLogger, tuple[Any, ...], dict[str, Any]], None] | None,
    after: Callable[[RunLogger, Any, float], None] | None,
) -> Callable[P, R]:
    """Wrap ``fn`` so ``before`` logs ahead of the call and ``after`` logs its result.

    Above an ``@mlflow_run`` (``fn`` starts a run), both log to *that* run, whatever run is
    active around the call: the decorators of one function share a call scope, which the
    run fills once it starts and which ends it once the outermost decorator is done.
    """
    starts_run = _starts_run(fn)

    def enter(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[_CallScope | None, Any]:
        if not starts_run:
            if before is not None:
                before(_active_logger(fn), args, kwargs)
            return None, None
        scope, owned = _call_scope.get(), None
        if scope is None or scope.run is not None:  # the outermost decorator of this call
            scope = _CallScope()
            owned = _call_scope.set(scope)
        if before is not None:
            scope.deferred.append(lambda logger: before(logger, args, kwargs))
        return scope, owned

    def log_after(scope: _CallScope | None, result: Any, elapsed: float) -> None:
        if after is None:
            return
        if scope is None:
            after(_active_logger(fn), result, elapsed)
        elif scope.run is None:
            raise NoActiveRunError(f"{fn.__qualname__!r}: the run it logs to was never started")
        else:
            after(RunLogger(scope.run), result, elapsed)

    if inspect.iscoroutinefunction(fn):
        afn = cast(Callable[P, Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            scope, owned = enter(args, kwargs)
            error: BaseException | None = None
            try:
                start = time.perf_counter()
                result = await afn(*args, **kwargs)
                log_after(scope, result, time.perf_counter() - start)
                return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                if owned is not None and scope is not None:
                    _call_scope.reset(owned)
                    if scope.finish is not None:
                        await cast(Awaitable[None], scope.finish(error))

        wrapper: Any = async_wrapper
    else:

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            scope, owned = enter(args, kwargs)
            error: BaseException | None = None
            try:
                start = time.perf_counter()
                result = fn(*args, **kwargs)
                log_after(scope, result, time.perf_counter() - start)
                return result
            except BaseException as exc:
                error = exc
                raise
            finally:
                if owned is not None and scope is not None:
                    _call_scope.reset(owned)
                    if scope.finish is not None:
                        scope.finish(error)

        wrapper = sync_wrapper
    setattr(wrapper, _STARTS_RUN, starts_run)
    return cast(Callable[P, R], wrapper)


# ---------------------------------------------------------------------- mlflow_run


def mlflow_run(
    experiment_name: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the function inside a new run of ``experiment_name`` and log its duration as
    ``duration_seconds``. Inside an active run, the new run is its child."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        def open_scope() -> tuple[_RunScope, _CallScope | None]:
            tracker = MLflowExperimentTracker(experiment_name)
            scope = _call_scope.get()
            if scope is not None and scope.run is not None:
                scope = None  # an outer run exists: ours is an ordinary (nested) run
            return _RunScope(tracker, run_name, dict(tags or {}), nested=True), scope

        def adopt(run_scope: _RunScope, call: _CallScope | None, run: Run) -> None:
            if call is None:
                return
            call.run = run
            logger = RunLogger(run)
            for action in call.deferred:
                action(logger)

        if inspect.iscoroutinefunction(fn):
            afn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                run_scope, call = open_scope()
                await run_scope.__aenter__()
                run = run_scope.run
                error: BaseException | None = None
                start = time.perf_counter()
                try:
                    adopt(run_scope, call, run)
                    return await afn(*args, **kwargs)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    RunLogger(run).log_metric("duration_seconds", time.perf_counter() - start)
                    status = run_scope.deactivate(type(error) if error else None)
                    if call is None:
                        await run_scope.afinish(status, error)
                    else:
                        call.finish = lambda outer: run_scope.afinish(
                            _RunScope.status_of(outer) if outer else status, outer or error
                        )

            wrapper: Any = async_wrapper
        else:

            @functools.wraps(fn)
            def sync_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                run_scope, call = open_scope()
                run_scope.__enter__()
                run = run_scope.run
                error: BaseException | None = None
                start = time.perf_counter()
                try:
                    adopt(run_scope, call, run)
                    return fn(*args, **kwargs)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    RunLogger(run).log_metric("duration_seconds", time.perf_counter() - start)
                    status = run_scope.deactivate(type(error) if error else None)
                    if call is None:
                        run_scope.finish(status, error)
                    else:
                        call.finish = lambda outer: run_scope.finish(
                            _RunScope.status_of(outer) if outer else status, outer or error
                        )

            wrapper = sync_wrapper
        setattr(wrapper, _STARTS_RUN, True)
        return cast(Callable[P, R], wrapper)

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
