"""Events and the cheap checks the hot path makes before queueing them.

A metric is a plain tuple ``(run_id, key, value, timestamp, step)``, the timestamp in
seconds as ``time.time()`` gives it (converted to MLflow's milliseconds on the worker): it
is the most frequent event, and a 5-tuple is the smallest object that holds it (about 150
bytes with its value and timestamp). Everything else is a :class:`MetaEvent` or a :class:`Barrier`,
rare enough that a class costs nothing.
"""

from __future__ import annotations

import concurrent.futures
import math
import numbers
import posixpath
import re
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Union

Metric = tuple[str, str, Any, float, int]

# MLflow's limits (mlflow/utils/validation.py); the server rejects anything beyond them.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

_KEY_RE = re.compile(r"^[/\w.\- :]*$")
# Keys already checked: a set lookup is far cheaper than the regex on every call.
_checked_keys: set[str] = set()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_key(key: object, what: str) -> str:
    """Validate a metric, param or tag key as MLflow does; raise ``ValueError`` naming it."""
    if not isinstance(key, str):
        raise ValueError(f"{what} key must be a string, got {type(key).__name__}: {key!r}")
    if key in _checked_keys:
        return key
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} key {key[:60]!r}... is {len(key)} characters; the limit is 250")
    if not _KEY_RE.match(key):
        raise ValueError(
            f"{what} key {key!r} is invalid: keys may only contain alphanumerics, "
            "underscores, dashes, periods, spaces, colons and slashes"
        )
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        raise ValueError(f"{what} key {key!r} is invalid: it would resolve to the path {norm!r}")
    if len(_checked_keys) < 100_000:  # bounded, so generated keys cannot grow it forever
        _checked_keys.add(key)
    return key


def check_value(key: str, value: object) -> Any:
    """Slow path for metric values that are not plain ``float``/``int``: numpy scalars and
    other real numbers become ``float`` here, as MLflow stores them, so the queue and the
    spool hold only built-in types."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"metric {key!r}: value must be a real number, got {type(value).__name__}: {value!r}"
        )
    return float(value)


def check_step(key: str, step: object) -> int:
    if type(step) is int:
        return step
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"metric {key!r}: step must be an integer, got {step!r}")
    return int(step)


def to_json_number(value: Any) -> str:
    """A metric value as JSON, with protobuf's spelling of NaN and infinities."""
    f = float(value)
    if math.isfinite(f):
        return repr(f)
    if math.isnan(f):
        return '"NaN"'
    return '"Infinity"' if f > 0 else '"-Infinity"'


def check_text_value(kind: str, key: str, value: object, limit: int) -> str:
    """Params and tags are stored as strings; over-long ones are truncated as MLflow does."""
    text = str(value)
    if len(text) > limit:
        from mlflow.environment_variables import MLFLOW_TRUNCATE_LONG_VALUES

        if not MLFLOW_TRUNCATE_LONG_VALUES.get():
            raise ValueError(
                f"{kind} {key!r}: value is {len(text)} characters; the limit is {limit}"
            )
        warnings.warn(
            f"{kind} {key!r}: value of {len(text)} characters truncated to {limit}",
            stacklevel=_stacklevel_outside_package(),
        )
        text = text[:limit]
    return text


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside asynctrack."""
    frame = sys._getframe(2)  # the caller of the function that warns
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("asynctrack"):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


class MetaEvent:
    """A param, a tag, or a run's end: sent in order within its run."""

    __slots__ = ("key", "kind", "run_id", "value")

    def __init__(self, kind: Literal["param", "tag", "end"], run_id: str, key: str, value: str):
        self.kind = kind
        self.run_id = run_id
        self.key = key
        self.value = value  # for "end": the status, e.g. "FINISHED"


class Job:
    """Work for the worker's event loop other than ``log_batch`` calls (an artifact upload).

    ``work(engine)`` is awaited on the worker's loop, where it may use the engine's
    ``run_blocking``, ``resources`` and ``exit_stack``; an exception it raises is reported
    at the next flush as a refusal of ``label`` (e.g. the artifact's path). Flushes and run
    ends wait for jobs queued before them. ``spooled``, when given, is what the spool keeps
    so ``asynctrack sync`` can redo the job after a crash: ``(staged file or staging area,
    artifact dir or None)``; the area is laid out as the run's artifact paths.
    """

    __slots__ = ("kind", "label", "run_id", "spooled", "work")

    def __init__(
        self,
        run_id: str,
        kind: str,
        label: str,
        work: Callable[[Any], Awaitable[None]],
        spooled: tuple[str, str | None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.kind = kind
        self.label = label
        self.work = work
        self.spooled = spooled


class Barrier:
    """Placed in the queue by flush(): resolved once everything before it is stored."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()


Event = Union[Metric, MetaEvent, Job, Barrier]  # noqa: UP007 (a runtime alias on 3.10)
