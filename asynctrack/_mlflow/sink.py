"""The one door from the MLflow patch to asynctrack's engine and run layer.

Everything the patched MLflow functions hand over goes through here: a run's metrics,
params, tags, tag deletions, artifacts and end, and the flushes that reads and
``synchronous=True`` need. Validation raises MLflow's exceptions at the call (an
``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which is also the ``TypeError`` or
``OverflowError`` MLflow's conversion raises). Timestamps arrive as MLflow's integer
milliseconds; how the engine keeps them is this module's business only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from asynctrack._engine import all_engines, get_engine
from asynctrack._engine.events import (
    INT64_MAX,
    INT64_MIN,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MetaEvent,
    check_key,
    check_step,
    check_text_value,
    check_timestamp,
    check_value,
)
from asynctrack.errors import (
    FlushTimeoutError,
    ParamConflictError,
)

_INT64_MIN, _INT64_MAX = INT64_MIN, INT64_MAX

#: Tracking URI schemes the engine stores to (REST servers, and MLflow's own stores through
#: ``MlflowClient``); anything else (``databricks``, plugin schemes) stays on MLflow's path.
_SERVED = ("http://", "https://", "file:", "sqlite:", "postgresql", "mysql", "mssql")

# Keys already validated: a set lookup instead of the regex on every call.
_valid_keys: set[str] = set()
_MAX_VALID_KEYS = 100_000


def serves(tracking_uri: str) -> bool:
    """Whether the engine can store to ``tracking_uri`` (a local path counts as ``file:``)."""
    if tracking_uri.startswith(_SERVED):
        return True
    # A bare path is MLflow's file store; "databricks" (a profile, no scheme) is not one.
    return ":" not in tracking_uri and not tracking_uri.startswith("databricks")


class RunSink:
    """One run of one tracking server, as the patch sees it: where its events go."""

    __slots__ = ("_put", "params", "run_id", "tracking_uri")

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._put = get_engine(tracking_uri).queue.put  # the hot path's door
        # Params already logged: a changed value is refused at the call, as the server
        # would refuse the whole request (metrics included).
        self.params: dict[str, str] = {}

    def metric(self, key: str, value: Any, timestamp_ms: int | None, step: int) -> None:
        """The hot path: validate (raising MLflow's exceptions), queue, return."""
        if key not in _valid_keys:
            _check_key(key, "metric")
        if type(value) is not float:
            value = _value(key, value)
        if type(step) is not int or not _INT64_MIN <= step <= _INT64_MAX:
            step = check_step(key, step)
        # The engine takes time.time() seconds for "now", or the caller's integer ms.
        if timestamp_ms is None:
            when: float | int = time.time()
            if type(when) is not float:  # a clock a test replaced: MLflow's int(t * 1000)
                when = int(when * 1000)
        elif type(timestamp_ms) is int and 0 <= timestamp_ms <= _INT64_MAX:
            when = timestamp_ms
        else:
            when = check_timestamp(key, timestamp_ms)
        self._put((self.run_id, key, value, when, step))

    def batch(
        self,
        rows: Iterable[tuple[str, Any, int | None, int]] = (),
        params: Sequence[tuple[str, Any]] = (),
        tags: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Metrics ``(key, value, timestamp_ms, step)``, params and tags: every entry is
        checked before any is queued, so a refused call leaves the run as it was (as the
        server refuses a whole ``log_batch`` request)."""
        now: float | int = time.time()
        if type(now) is not float:  # a clock a test replaced: MLflow's int(t * 1000)
            now = int(now * 1000)
        run_id = self.run_id
        events: list[Any] = []
        append = events.append
        for key, value, timestamp_ms, step in rows:
            if key not in _valid_keys:
                _check_key(key, "metric")
            if type(value) is not float:
                value = _value(key, value)
            if type(step) is not int or not _INT64_MIN <= step <= _INT64_MAX:
                step = check_step(key, step)
            if timestamp_ms is None:
                when: float | int = now
            elif type(timestamp_ms) is int and 0 <= timestamp_ms <= _INT64_MAX:
                when = timestamp_ms
            else:
                when = check_timestamp(key, timestamp_ms)
            append((run_id, key, value, when, step))
        if params:
            _check_unique(params)
            events += [e for e in (self._param(k, v) for k, v in params) if e is not None]
        events += [self._tag(key, value) for key, value in tags]
        put = self._put
        for event in events:
            put(event)
        for event in events:
            if type(event) is MetaEvent and event.kind == "param":
                self.params.setdefault(event.key, event.value)

    def _param(self, key: str, value: Any) -> MetaEvent | None:
        _check_key(key, "param")
        text = check_text_value("param", key, value, MAX_PARAM_VALUE_LENGTH)
        before = self.params.get(key)
        if before is None:
            return MetaEvent("param", self.run_id, key, text)
        if before != text:
            raise ParamConflictError(
                f"Changing param values is not allowed. Param with key='{key}' was already "
                f"logged with value='{before}' for run ID='{self.run_id}'. Attempted logging "
                f"new value '{text}'."
            )
        return None

    def _tag(self, key: str, value: Any) -> MetaEvent:
        _check_key(key, "tag")
        text = check_text_value("tag", key, value, MAX_TAG_VALUE_LENGTH)
        return MetaEvent("tag", self.run_id, key, text)

    def flush(self, timeout: float | None = None, report: bool = True) -> None:
        """Return once this run's queued events are stored; raise what was refused."""
        get_engine(self.tracking_uri).flush(timeout, run_id=self.run_id, report=report)

    def end(self, status: str) -> None:
        """A barrier: store every queued event of the run, then set its status."""
        get_engine(self.tracking_uri).end_run(self.run_id, status)

    def log_files(self, run: Any, method: str, *args: Any, **kwargs: Any) -> None:
        """Artifact methods (``log_artifact``, ``log_dict``...) of asynctrack's trackers:
        the input is captured now, stored by the engine's worker."""
        from asynctrack._runs import Run
        from asynctrack.tracker import RunLogger

        run_layer = Run(
            run_id=self.run_id,
            experiment_id=run.info.experiment_id,
            tracking_uri=self.tracking_uri,
            artifact_uri=run.info.artifact_uri,
            engine=get_engine(self.tracking_uri),
            entity=run,
        )
        getattr(RunLogger(run_layer), method)(*args, **kwargs)


_sinks: dict[tuple[str, str], RunSink] = {}
_sinks_lock = threading.Lock()


def run(tracking_uri: str, run_id: str) -> RunSink:
    """The sink of one run (cached: the fluent hot path looks it up on every call)."""
    sink = _sinks.get((tracking_uri, run_id))
    if sink is None:
        with _sinks_lock:
            sink = _sinks.get((tracking_uri, run_id))
            if sink is None:
                if len(_sinks) > 10_000:
                    _sinks.clear()
                sink = _sinks[(tracking_uri, run_id)] = RunSink(tracking_uri, run_id)
    return sink


def forget() -> None:
    """Drop cached sinks (at unpatch, and when the engine is reconfigured)."""
    with _sinks_lock:
        _sinks.clear()


def flush_for_read(tracking_uri: str, run_ids: Sequence[str] | None) -> None:
    """Before a read: wait (at most the engine's ``flush_timeout``) until what this process
    queued for ``run_ids`` (every run, when None) is stored. Refusals stay for the next
    flush or run end."""
    engine = _existing_engine(tracking_uri)
    if engine is None:
        return
    with contextlib.suppress(FlushTimeoutError):
        if run_ids is None or len(run_ids) != 1:
            engine.flush(None, report=False)
        else:
            engine.flush(None, run_id=run_ids[0], report=False)


def flush_all(timeout: float | None = None) -> None:
    """``mlflow.flush_async_logging()``: everything queued, to every server."""
    from asynctrack._engine import flush_all as _flush_all

    _flush_all(timeout)


def _existing_engine(tracking_uri: str) -> Any:
    for engine in all_engines():
        if engine.tracking_uri == tracking_uri:
            return engine
    return None


def _value(key: str, value: Any) -> Any:
    return check_value(key, value)


def _check_unique(params: Sequence[tuple[str, Any]]) -> None:
    keys = [key for key, _ in params]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise MlflowException(
            f"Duplicate parameter keys have been submitted: {dupes}. Please ensure the request "
            "contains only one param value per param key.",
            INVALID_PARAMETER_VALUE,
        )


def _check_key(key: Any, what: str) -> None:
    check_key(key, what)
    if len(_valid_keys) < _MAX_VALID_KEYS:
        _valid_keys.add(key)


_exit_hooks: list[Any] = []


def at_exit(hook: Any) -> None:
    """Run ``hook`` at interpreter exit before the engines close (once per hook)."""
    from asynctrack._engine.runtime import before_exit

    if hook not in _exit_hooks:
        _exit_hooks.append(hook)
        before_exit.append(hook)
