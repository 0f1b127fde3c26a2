"""Counters the worker keeps, and the snapshot users read with ``asynctrack.stats()``."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict


@dataclass(frozen=True)
class Stats:
    """What happened to the events handed to asynctrack so far, in this process.

    ``queued`` events are accepted but not yet stored; ``sent`` were stored by the server;
    ``retried`` counts events re-sent after a transient failure (once per retry);
    ``rejected`` were refused by the server and reported by ``flush()``; ``dropped`` were
    turned away by a full queue (``dropped_reasons`` counts them by reason: the "drop"
    policy, or "block" after its one wait); ``kept`` are held back by the server for
    credentials or a permission (kept, sent again, not lost); ``batches_sent`` counts
    successful ``log_batch`` calls; ``in_flight`` is the number of requests under way.

    Artifact files (models' files included) are counted apart, in files and bytes:
    ``files_queued`` were captured and are not yet stored; ``files_uploaded`` were stored;
    ``files_retried`` counts uploads (or parts of one) sent again after a transient
    failure; ``files_failed`` could not be stored and were reported by ``flush()``.

    The spool: ``spooled`` events are on local disk and not yet stored (they survive a
    crash), ``spool_bytes`` is the size of their segments, and ``durable`` counts events
    made durable (fsync'ed) so far.

    ``mlflow_path`` counts requests to a tracking server sent through MLflow's own HTTP
    client instead of asynctrack's (about 3 ms of CPU each), by the reason they had to be:
    a request-auth plugin (``MLFLOW_TRACKING_AUTH``), AWS SigV4, Databricks, a proxy.
    """

    queued: int = 0
    sent: int = 0
    retried: int = 0
    rejected: int = 0
    dropped: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    batches_sent: int = 0
    in_flight: int = 0
    files_queued: int = 0
    files_uploaded: int = 0
    files_retried: int = 0
    files_failed: int = 0
    bytes_queued: int = 0
    bytes_uploaded: int = 0
    bytes_retried: int = 0
    bytes_failed: int = 0
    spooled: int = 0
    spool_bytes: int = 0
    durable: int = 0
    mlflow_path: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: Stats) -> Stats:
        mine, theirs = asdict(self), asdict(other)
        return Stats(**{k: _sum(mine[k], theirs[k]) for k in mine})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sum(a: Any, b: Any) -> Any:
    """Two counts, or two tables of counts by reason, added up."""
    if isinstance(a, dict):
        return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}
    return a + b


class FileCounters:
    """An engine's artifact counters: callers count what they queue, the worker the rest.

    Both sides write, from different threads, so every update takes the (uncontended) lock;
    an artifact call costs milliseconds, the lock tens of nanoseconds.
    """

    _FIELDS = ("queued", "uploaded", "retried", "failed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files = dict.fromkeys(self._FIELDS, 0)
        self._bytes = dict.fromkeys(self._FIELDS, 0)

    def queued(self, files: int, size: int) -> None:
        self._add("queued", files, size)

    def uploaded(self, size: int) -> None:
        self._settle("uploaded", size)

    def failed(self, size: int) -> None:
        self._settle("failed", size)

    def retried(self, size: int) -> None:
        self._add("retried", 1, size)

    def _settle(self, outcome: str, size: int) -> None:
        with self._lock:
            self._files["queued"] -= 1
            self._bytes["queued"] -= size
            self._files[outcome] += 1
            self._bytes[outcome] += size

    def _add(self, field: str, files: int, size: int) -> None:
        with self._lock:
            self._files[field] += files
            self._bytes[field] += size

    def snapshot(self) -> FileSnapshot:
        with self._lock:
            files, size = dict(self._files), dict(self._bytes)
        return FileSnapshot(
            files_queued=files["queued"], files_uploaded=files["uploaded"],
            files_retried=files["retried"], files_failed=files["failed"],
            bytes_queued=size["queued"], bytes_uploaded=size["uploaded"],
            bytes_retried=size["retried"], bytes_failed=size["failed"],
        )  # fmt: skip


class FileSnapshot(TypedDict):
    """The artifact counters, as :class:`Stats` names them."""

    files_queued: int
    files_uploaded: int
    files_retried: int
    files_failed: int
    bytes_queued: int
    bytes_uploaded: int
    bytes_retried: int
    bytes_failed: int
