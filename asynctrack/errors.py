"""Errors raised by asynctrack.

Every error derives from :class:`AsyncTrackError`; each subclass also derives from the
built-in exception it resembles, so ``except TimeoutError`` or ``except ValueError`` keep
working for code that does not know asynctrack::

    AsyncTrackError
    ├── NoActiveRunError (RuntimeError)      logging with no run started
    ├── ConfigError (ValueError)             an invalid engine setting
    ├── InvalidInputError (MlflowException, ValueError)
    │   │                                    a key, value, step or timestamp MLflow refuses
    │   ├── InvalidInputTypeError (TypeError)  ...of a type MLflow cannot convert
    │   ├── ValueOverflowError (OverflowError) an int too large for a double
    │   └── ParamConflictError               a param re-logged with another value
    ├── QueueFullError (BufferError)         the queue is full (policy "raise")
    ├── FlushTimeoutError (TimeoutError)     flush() or run end passed its deadline
    ├── DeliveryError (MlflowException)      the server refused some events
    │   └── AccessDeniedError                ...or held them back: credentials, permission
    └── EngineClosedError (RuntimeError)     logging after the engine shut down

Input MLflow would refuse is refused at the call with an ``InvalidInputError``: it is also
the ``MlflowException`` MLflow raises (error code ``INVALID_PARAMETER_VALUE``), and the
built-in MLflow's conversion raises (``ValueError``, ``TypeError`` for an unconvertible type,
``OverflowError`` for an int beyond a double's range), so existing ``except`` clauses work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    ErrorCode,
)


def _code(rejections: Sequence[Rejection]) -> int:
    """The MLflow error code a refusal's reason starts with (``INVALID_STATE: ...``)."""
    name = rejections[0].reason.split(":", 1)[0] if rejections else ""
    try:
        return int(ErrorCode.Value(name))
    except ValueError:  # not one of MLflow's codes: a timeout, an upload's own error
        return int(INTERNAL_ERROR)


__all__ = [
    "AccessDeniedError",
    "AsyncTrackError",
    "ConfigError",
    "DeliveryError",
    "EngineClosedError",
    "FlushTimeoutError",
    "InvalidInputError",
    "InvalidInputTypeError",
    "KeptEvents",
    "NoActiveRunError",
    "ParamConflictError",
    "QueueFullError",
    "Rejection",
    "ValueOverflowError",
]


class AsyncTrackError(Exception):
    """Root of every error asynctrack raises."""


class NoActiveRunError(AsyncTrackError, RuntimeError):
    """A logging call found no run: start one with ``with tracker.start_run():``."""


class ConfigError(AsyncTrackError, ValueError):
    """An engine setting (keyword argument or ``ASYNCTRACK_*`` variable) is invalid."""


class InvalidInputError(AsyncTrackError, MlflowException, ValueError):
    """A key, value, step or timestamp MLflow would refuse; raised at the logging call."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class InvalidInputTypeError(InvalidInputError, TypeError):
    """A metric value, step or timestamp of a type that is not a number MLflow converts."""


class ValueOverflowError(InvalidInputError, OverflowError):
    """A metric value too large for a double (MLflow raises ``OverflowError`` too)."""


class ParamConflictError(InvalidInputError):
    """A param was logged again in the same run with a different value (MLflow forbids it)."""


class QueueFullError(AsyncTrackError, BufferError):
    """The event queue stayed full: the server is too slow or unreachable."""


class FlushTimeoutError(AsyncTrackError, TimeoutError):
    """Events were still unsent when a flush deadline passed; they stay queued."""

    def __init__(self, message: str, pending: int) -> None:
        super().__init__(message)
        self.pending = pending


class EngineClosedError(AsyncTrackError, RuntimeError):
    """The engine was shut down (interpreter exit) and takes no more events."""


@dataclass(frozen=True)
class Rejection:
    """One event the server refused, and why."""

    run_id: str
    kind: str  # "metric", "param", "tag", "run", "artifact" or "model"
    key: str
    reason: str

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.kind} {self.key!r}: {self.reason}"


@dataclass(frozen=True)
class KeptEvents:
    """Events a server held back (it refused the credentials or a permission): kept, not
    refused. ``where``: the spool directory that holds them ("" when there is none)."""

    server: str  # the tracking URI, credentials hidden
    count: int
    reason: str  # e.g. "HTTP 401: You are not authenticated"
    where: str

    def __str__(self) -> str:
        if not self.where:
            return (
                f"{self.count} event(s) kept in memory for {self.server} ({self.reason}); "
                "they are sent again while this process runs (no spool: lost at exit)"
            )
        return (
            f"{self.count} event(s) kept for {self.server} ({self.reason}), sent again "
            f"while this process runs; after it, once the credentials or permissions are "
            f"fixed: asynctrack sync {self.where} --tracking-uri {self.server}"
        )


def summarize(rejections: Sequence[Rejection], shown: int = 3) -> list[str]:
    """Rejections grouped by reason, one line a reason, with a few of their events."""
    groups: dict[str, list[Rejection]] = {}
    for rejection in rejections:
        groups.setdefault(rejection.reason, []).append(rejection)
    return [
        refusal_line(reason, len(group), group[:shown], len({r.run_id for r in group}))
        for reason, group in groups.items()
    ]


def refusal_line(reason: str, count: int, examples: Sequence[Rejection], runs: int) -> str:
    """``count`` events of ``runs`` runs refused for ``reason``, a few of them named."""
    if count == 1:
        return str(examples[0])
    where = f"run {examples[0].run_id}" if runs == 1 else f"{runs} runs"
    names = ", ".join(f"{r.kind} {r.key!r}" for r in examples)
    more = f" and {count - len(examples)} more" if count > len(examples) else ""
    return f"{count} refused ({where}: {names}{more}): {reason}"


class DeliveryError(AsyncTrackError, MlflowException):
    """The server refused some events (or an upload failed), or held some back; every
    other event was stored.

    ``rejections`` lists each refused event with its run, key and the server's reason;
    ``kept`` what a server held back for credentials or a permission (kept on disk, sent
    again, never dropped). The message groups them: a few lines for any number of events.
    Also an ``MlflowException`` (so ``except MlflowException`` code keeps working), with
    the error code of the first refusal when the server gave one.
    """

    def __init__(self, rejections: Sequence[Rejection], kept: Sequence[KeptEvents] = ()) -> None:
        self.rejections = list(rejections)
        self.kept = list(kept)
        lines = [str(k) for k in self.kept] + summarize(self.rejections)
        count = len(self.rejections) + sum(k.count for k in self.kept)
        code = _code(self.rejections) if self.rejections else _held_code(self.kept)
        super().__init__(f"{count} event(s) not stored:\n  " + "\n  ".join(lines), code)


class AccessDeniedError(DeliveryError):
    """A server refused the credentials or a permission (HTTP 401, 403, 407): the events
    are kept (``kept``), sent again while the process runs with credentials resolved
    anew, and deliverable later by ``asynctrack sync``."""


def _held_code(kept: Sequence[KeptEvents]) -> int:
    reason = kept[0].reason if kept else ""
    if reason.startswith(("HTTP 401", "HTTP 407", "UNAUTHENTICATED")):
        return int(UNAUTHENTICATED)
    return int(PERMISSION_DENIED)
