"""The ledger: what happened to every event an engine (or a sync) took on.

The worker's thread writes every count; callers only read them (``stats()``, a timeout's
message), so no lock is needed for them: a reader may see a count a moment old. Two things
cross threads and take the lock: the rejections a caller's ``flush()`` collects, and the
drops a caller's full queue makes under the "drop" policy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from asynctrack._engine.stats import FileCounters, Stats
from asynctrack.errors import Rejection, refusal_line

logger = logging.getLogger("asynctrack")


class Ledger:
    def __init__(self, on_settled: Callable[[int], None] | None = None) -> None:
        self.held = 0  # taken off the queue, not yet stored or refused
        self.sent = self.retried = self.rejected = self.batches = self.in_flight = 0
        self.done = 0  # run ends and jobs finished: settled, but not events "sent"
        self.dropped = 0  # callers', under the lock
        self.dropped_reasons: dict[str, int] = {}  # under the lock
        self.last_error = ""  # why the last retry or refusal happened, for messages
        self.files = FileCounters()
        self._on_settled = on_settled  # sync's progress bar
        self._lock = threading.Lock()
        self._rejections: list[Rejection] = []
        # every refusal of the engine's life, by reason: (count, the first few), for the
        # summary at exit; a reason is logged once, not once an event
        self._refusals: dict[str, tuple[int, list[Rejection], set[str]]] = {}

    def took(self, count: int) -> None:
        self.held += count

    def stored(self, count: int, request: bool = True) -> None:
        """``count`` events stored (by one request, or folded into others: ``request=False``)."""
        self.held -= count
        self.sent += count
        self.batches += request
        if self._on_settled is not None and count:
            self._on_settled(count)

    def completed(self, count: int) -> None:
        """``count`` run ends or jobs finished."""
        self.held -= count
        self.done += count
        if self._on_settled is not None:
            self._on_settled(count)

    def retrying(self, count: int, reason: str) -> None:
        self.retried += count
        self.last_error = reason

    def refused(self, rejections: list[Rejection]) -> None:
        self.held -= len(rejections)
        self.rejected += len(rejections)
        self.last_error = rejections[0].reason
        with self._lock:
            self._rejections.extend(rejections)
        for rejection in rejections:
            reason = rejection.reason
            if reason not in self._refusals and len(self._refusals) >= 100:
                reason = "(and other reasons)"  # bounded, whatever the server says
            count, examples, runs = self._refusals.get(reason, (0, [], set()))
            if not count:
                logger.warning(
                    "asynctrack: server refused %s (more refused for the same reason are "
                    "counted, and reported at the next flush)",
                    rejection,
                )
            if len(examples) < 3:
                examples.append(rejection)
            if len(runs) < 1000:
                runs.add(rejection.run_id)
            self._refusals[reason] = (count + 1, examples, runs)
        if self._on_settled is not None:
            self._on_settled(len(rejections))

    def drop(self, reason: str) -> bool:
        """Count one event a full queue turned away; True the first time for ``reason``."""
        with self._lock:
            self.dropped += 1
            count = self.dropped_reasons.get(reason, 0)
            self.dropped_reasons[reason] = count + 1
        return not count

    def take_rejections(self, run_id: str | None = None) -> list[Rejection]:
        """The rejections not yet reported (only ``run_id``'s, when given), now reported."""
        with self._lock:
            if run_id is None:
                everything, self._rejections = self._rejections, []
                return everything
            taken: list[Rejection] = []
            kept: list[Rejection] = []
            for rejection in self._rejections:
                (taken if rejection.run_id == run_id else kept).append(rejection)
            self._rejections = kept
        return taken

    def refusal_lines(self) -> list[str]:
        """Every refusal so far, one line a reason with a few of its events (for exit)."""
        return [
            refusal_line(reason, count, examples, len(runs))
            for reason, (count, examples, runs) in self._refusals.items()
        ]

    def all_rejections(self) -> list[Rejection]:
        with self._lock:
            return list(self._rejections)

    def stats(
        self, queued: int, spooled: int, spool_bytes: int, durable: int, kept: int = 0
    ) -> Stats:
        return Stats(
            queued=queued,
            sent=self.sent,
            retried=self.retried,
            rejected=self.rejected,
            dropped=self.dropped,
            dropped_reasons=dict(self.dropped_reasons),
            batches_sent=self.batches,
            in_flight=self.in_flight,
            spooled=spooled,
            spool_bytes=spool_bytes,
            durable=durable,
            kept=kept,
            **self.files.snapshot(),
        )
