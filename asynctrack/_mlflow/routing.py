"""Which calls the engine serves, and what a patched call returns.

A run's sink is looked up by run id on every fluent call (a dict lookup); the tracking
URI is resolved once per run, as MLflow resolves it when the call comes. A URI the engine
cannot serve is cached as ``None``: those calls keep MLflow's path, with one notice.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from typing import Any

import mlflow
from mlflow.environment_variables import MLFLOW_ENABLE_ASYNC_LOGGING
from mlflow.utils.async_logging.run_operations import RunOperations

from asynctrack._mlflow import private, sink

_by_run: dict[str, sink.RunSink | None] = {}
_served: dict[str, bool] = {}
_lock = threading.Lock()

# MLflow reads MLFLOW_ENABLE_ASYNC_LOGGING at every call left at ``synchronous=None``, so a
# script may switch it while it runs; so do we. os.environ's mapping costs 0.6 us a read
# (half a patched call), its dict 20 ns: read the dict (CPython keeps os.environ's data
# there, keys encoded), and let MLflow parse a value once per distinct value.
_environ: dict[Any, Any] | None = getattr(os.environ, "_data", None)
_async_key: Any = None
if isinstance(_environ, dict) and hasattr(os.environ, "encodekey"):
    _async_key = os.environ.encodekey(MLFLOW_ENABLE_ASYNC_LOGGING.name)
else:  # not CPython's os.environ: MLflow's own read, slower, the same answer
    _environ = None
_async_values: dict[Any, bool] = {}


def default_async() -> bool:
    """Whether a call with ``synchronous=None`` is asynchronous (returns an operation to
    wait on), as ``MLFLOW_ENABLE_ASYNC_LOGGING`` says right now."""
    if _environ is None:
        return bool(MLFLOW_ENABLE_ASYNC_LOGGING.get())
    raw = _environ.get(_async_key)
    if raw is None:
        return False
    value = _async_values.get(raw)
    if value is None:
        value = bool(MLFLOW_ENABLE_ASYNC_LOGGING.get())  # raises on a bad value, as MLflow
        if len(_async_values) < 100:
            _async_values[raw] = value
    return value


def real(function: Any) -> Any:
    """MLflow's own function behind a trampoline of the environment switch (see
    ``asynctrack_mlflow_hook``), or the function itself."""
    return getattr(function, "__asynctrack_original__", function)


def sink_of_run(run_id: str) -> sink.RunSink | None:
    """The sink of a run of the current tracking URI (fluent calls), None for MLflow's path."""
    try:
        return _by_run[run_id]
    except KeyError:
        pass
    s = sink_of(mlflow.get_tracking_uri(), run_id)
    with _lock:
        if len(_by_run) > 10_000:
            _by_run.clear()
        _by_run[run_id] = s
    return s


def sink_of(tracking_uri: str, run_id: str) -> sink.RunSink | None:
    """The sink of ``run_id`` at ``tracking_uri``, None when the engine cannot serve it."""
    served = _served.get(tracking_uri)
    if served is None:
        served = _served[tracking_uri] = sink.serves(tracking_uri)
        if not served:
            from asynctrack._engine.transport import redact

            sys.stderr.write(
                f"asynctrack: tracking URI {redact(tracking_uri)} is not one asynctrack "
                "serves; MLflow's own logging path is used for it\n"
            )
    return sink.run(tracking_uri, run_id) if served else None


def forget() -> None:
    with _lock:
        _by_run.clear()
        _served.clear()
    sink.forget()


class _Stored:
    """A future for ``RunOperations``: its result is "the run's queued events are stored"."""

    __slots__ = ("_sink",)

    def __init__(self, s: sink.RunSink) -> None:
        self._sink = s

    def result(self, timeout: float | None = None) -> None:
        self._sink.flush(timeout)


def after(s: sink.RunSink, synchronous: bool | None, value: Any) -> Any:
    """MLflow's return contract: ``synchronous=True`` returns once stored (or raises what
    the server refused); ``False`` returns an operation to ``.wait()`` on; ``None`` (the
    default) queues and returns what MLflow's default mode returns."""
    if synchronous is None:
        # the usual case, inline: the variable is not set at all
        if _environ is not None and _async_key not in _environ:
            return value
        if not default_async():
            return value
    elif synchronous:
        s.flush()
        return value
    return RunOperations([_Stored(s)])


class _Refused:
    """A future for ``RunOperations`` whose result is the input error the call met."""

    __slots__ = ("_error",)

    def __init__(self, error: Exception) -> None:
        self._error = error

    def result(self, timeout: float | None = None) -> None:
        raise self._error


def refuse(synchronous: bool | None, error: Exception) -> Any:
    """Bad input: an asynchronous call (``synchronous=False``, or the default while
    ``MLFLOW_ENABLE_ASYNC_LOGGING`` is on) returns an operation whose ``.wait()`` raises
    it, as MLflow's does; any other call raises it now."""
    if synchronous is False or (synchronous is None and default_async()):
        return RunOperations([_Refused(error)])
    raise error


def print_run_url(s: sink.RunSink) -> None:
    """MLflow prints a link to the run when it ends (REST servers); so do we, without the
    ``user:password@`` MLflow's own line would show when the tracking URI carries one."""
    if not s.tracking_uri.startswith(("http://", "https://")):
        return
    from asynctrack._engine.transport import redact

    with contextlib.suppress(Exception):  # a link is not worth failing the run's end
        client = mlflow.MlflowClient(s.tracking_uri)
        if redact(s.tracking_uri) == s.tracking_uri:
            private.print_run_url(client, s.run_id)
            return
        # MLflow writes the line to sys.stdout itself: take it, and write it redacted
        lines = io.StringIO()
        try:
            with contextlib.redirect_stdout(lines):
                private.print_run_url(client, s.run_id)
        finally:
            sys.stdout.write(redact(lines.getvalue()))
