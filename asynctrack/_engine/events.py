"""Events and the cheap checks the hot path makes before queueing them.

A metric is a plain tuple ``(run_id, key, value, when, step)``: it is the most frequent
event, and a 5-tuple is the smallest object that holds it (about 150 bytes with its value
and timestamp). ``when`` is either ``time.time()`` taken at the call (a float, seconds)
or the caller's own timestamp, an ``int`` of milliseconds kept exactly as given. The worker
turns a float into ``int(when * 1000)``, which is what MLflow's ``get_current_time_millis``
computes, so both forms are stored exactly as plain MLflow would store them; only a float
costs nothing more on the hot path than ``time.time()``.

Values are made ``float`` at the call, as MLflow converts them, so the queue and the spool
hold only built-in types; the one exception is a tensor on an accelerator, whose
conversion would wait for the device: it is queued as a one-element copy and converted on
the worker (see :func:`check_value`). Everything else is a :class:`MetaEvent`, a
:class:`Job` or a :class:`Barrier`, rare enough that a class costs nothing.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import numbers
import posixpath
import re
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Union

from asynctrack.errors import (
    InvalidInputError,
    InvalidInputTypeError,
    Rejection,
    ValueOverflowError,
)

Metric = tuple[str, str, Any, "float | int", int]

#: MLflow stores steps and timestamps as int64 (a larger one breaks the whole request).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# MLflow's limits (mlflow/utils/validation.py); the server rejects anything beyond them.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

_KEY_RE = re.compile(r"^[/\w.\- :]*$")
# Keys already checked: a set lookup is far cheaper than the regex on every call.
_checked_keys: set[str] = set()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# Where MLflow's messages name a key: its JSON path (``name`` for a metric) and, for a key
# too long, its label.
_KEY_PATH = {"metric": "name", "param": "key", "tag": "key"}
_KEY_LABEL = {"metric": "Metric name", "param": "Param key", "tag": "key"}
_NAME_CHARS = (
    "Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), "
    "spaces ( ), colon(:) and slashes (/)."
)


def invalid_value(path: str, value: object, message: str) -> str:
    """MLflow's words for a value it refuses (``mlflow.utils.validation.invalid_value``)."""
    try:
        shown = json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        shown = _short_repr(value)
    return f"Invalid value {shown} for parameter '{path}' supplied: {message}"


def check_key(key: object, what: str) -> str:
    """Validate a metric, param or tag key as MLflow does; raise InvalidInputError with
    MLflow's message, then the key's kind."""
    if not isinstance(key, str):
        message = f"{what.capitalize()} {_KEY_PATH[what]} must be a string."
        raise InvalidInputError(
            f"{invalid_value(_KEY_PATH[what], key, message)} "
            f"({what} key of type {type(key).__name__})"
        )
    if key in _checked_keys:
        return key
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidInputError(
            f"'{_KEY_LABEL[what]}' exceeds the maximum length of {MAX_KEY_LENGTH} characters "
            f"({what} key {key[:60]!r}..., {len(key)} characters)"
        )
    if not _KEY_RE.match(key):
        message = invalid_value(_KEY_PATH[what], key, _NAME_CHARS)
        raise InvalidInputError(f"{message} ({what} key {key!r})")
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        message = invalid_value(
            _KEY_PATH[what],
            key,
            "Names may be treated as files in certain cases, and must not resolve to other "
            f"names when treated as such. This name would resolve to {norm!r}",
        )
        raise InvalidInputError(f"{message} ({what} key {key!r})")
    if len(_checked_keys) < 100_000:  # bounded, so generated keys cannot grow it forever
        _checked_keys.add(key)
    return key


def check_value(key: str, value: object) -> Any:
    """A metric value that is not a ``float``, converted as MLflow converts it.

    ``float(value)`` for ints, bools, numpy scalars, ``Decimal``, numeric strings and
    anything with ``__float__``; the element of a one-element array or tensor. A tensor on
    an accelerator (``device.type`` not ``"cpu"``) is not read here: reading it would wait
    for the device to finish its queued work, on the training loop's thread. It is queued
    as a detached copy (one more kernel on the device's stream, no wait) and converted on
    the worker. MLflow's own errors, raised here: ``OverflowError`` for an int beyond a
    double, ``TypeError`` for a type ``float()`` does not take, an ``MlflowException``
    (INVALID_PARAMETER_VALUE) for the rest; ours are all three at once.
    """
    try:
        device = getattr(value, "device", None)
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            return _device_copy(key, value)
        if getattr(value, "ndim", 0) and hasattr(value, "item"):
            value = value.item()  # one-element arrays and tensors only
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueOverflowError(
            f"int too large to convert to float (metric {key!r}: value {_short_repr(value)})"
        ) from None
    except TypeError:
        if value is None:
            raise InvalidInputTypeError(
                f"Missing value for required parameter 'value'. (metric {key!r})"
            ) from None
        raise InvalidInputTypeError(
            f"Failed to convert metric value to float: {type(value).__name__} "
            f"{_short_repr(value)} is not a number (metric {key!r})"
        ) from None
    except ValueError as exc:
        # A TypeError too: MLflow hands a non-numeric string on to protobuf, which raises one.
        if isinstance(value, str):
            message = invalid_value("value", value, _DOUBLE)
        else:
            message = f"Failed to convert metric value to float: {exc}"
        raise InvalidInputTypeError(f"{message} (metric {key!r})") from None


_DOUBLE = "Please specify value as a valid double (64-bit floating point)"


def _device_copy(key: str, tensor: Any) -> Any:
    if tensor.numel() != 1:  # a shape: known without waiting for the device
        raise ValueError(f"can only convert a tensor of one element, not {tensor.numel()}")
    return tensor.detach().clone()


def resolve_value(value: Any) -> float:
    """On the worker: the float of a value queued unconverted (a tensor on a device)."""
    return float(value.item() if hasattr(value, "item") else value)


def check_step(key: str, step: object) -> int:
    """A step given as a non-``int`` or outside int64 (the hot path checks the common case)."""
    number = _integer(step)
    if number is None or not INT64_MIN <= number <= INT64_MAX:
        message = f"metric {key!r}. Step must be a valid long (64-bit integer)."
        error = InvalidInputTypeError if number is None else InvalidInputError
        raise error(invalid_value("step", step, message))
    return number


def check_timestamp(key: str, timestamp: object) -> int:
    """A caller's timestamp: an integer of milliseconds, from 0 to the int64 maximum."""
    number = _integer(timestamp)
    if number is None or not 0 <= number <= INT64_MAX:
        message = (
            f"metric {key!r}. Timestamp must be a nonnegative long (64-bit integer) of milliseconds"
        )
        error = InvalidInputTypeError if number is None else InvalidInputError
        raise error(invalid_value("timestamp", timestamp, message))
    return number


def _integer(number: object) -> int | None:
    """An integral number (numpy's too) as an ``int``; None for anything else, bools included."""
    if isinstance(number, bool) or not isinstance(number, numbers.Integral):
        return None
    return int(number)


def to_ms(when: float | int) -> int:
    """A metric's ``when`` as MLflow's integer milliseconds."""
    return when if type(when) is int else int(when * 1000)


def to_seconds(when: float | int) -> float:
    return when / 1000 if type(when) is int else float(when)


def resolve_chunk(events: list[Any]) -> list[Rejection]:
    """On the worker, before a chunk is spooled: convert values queued unconverted.

    An event whose value still cannot be converted is taken out of ``events`` and returned
    as a refusal, so it costs no other event its place.
    """
    refused: list[Rejection] = []
    kept: list[Any] = []
    for event in events:
        if type(event) is tuple and type(event[2]) is not float:
            try:
                event = (event[0], event[1], resolve_value(event[2]), event[3], event[4])
            except Exception as exc:
                reason = f"cannot convert the value to a double: {type(exc).__name__}: {exc}"
                refused.append(Rejection(event[0], "metric", event[1], reason))
                continue
        kept.append(event)
    events[:] = kept
    return refused


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..." + text[-10:]


def to_json_number(value: Any) -> str:
    """A metric value as JSON, with protobuf's spelling of NaN and infinities."""
    f = value if type(value) is float else resolve_value(value)
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
            raise InvalidInputError(
                f"'{kind.capitalize()} value' exceeds the maximum length of {limit} characters "
                f"({kind} {key!r}: {len(text)} characters)"
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

    __slots__ = ("key", "kind", "run_id", "value", "when")

    def __init__(
        self,
        kind: Literal["param", "tag", "end"],
        run_id: str,
        key: str,
        value: str,
        when: int | None = None,
    ):
        self.kind = kind
        self.run_id = run_id
        self.key = key
        self.value = value  # for "end": the status, e.g. "FINISHED"
        #: for "end": when the run ended (ms), so a run ended late (after an outage, by
        #: ``asynctrack sync``) keeps its own end time; None in an old spool
        self.when = when


def end_event(run_id: str, status: str) -> MetaEvent:
    """A run's end, stamped now."""
    return MetaEvent("end", run_id, "status", status, now_ms())


class Job:
    """Work for the worker's event loop other than ``log_batch`` calls (an artifact upload).

    ``work(engine)`` is awaited on the worker's loop, where it may use the engine's
    ``run_blocking``, ``resources`` and ``exit_stack``; an exception it raises is reported
    at the next flush as a refusal of ``label`` (e.g. the artifact's path). Flushes and run
    ends wait for jobs queued before them. ``spooled``, when given, is what the spool keeps
    so ``asynctrack sync`` can redo the job after a crash: ``(staged file or staging area,
    artifact dir or None)``, the area laid out as the run's artifact paths; for a model,
    ``(staging area, what the call asked for)``.
    """

    __slots__ = ("kind", "label", "run_id", "spooled", "work")

    def __init__(
        self,
        run_id: str,
        kind: str,
        label: str,
        work: Callable[[Any], Awaitable[None]],
        spooled: tuple[str, Any] | None = None,
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
