"""The engine: everything logged to one tracking URI in this process goes through one.

It puts the pieces together and owns their lifecycle::

    callers --put--> EventQueue --take--> Intake --spool--> disk
                                            |  window (or the backlog, read back)
                                            v
                        Dispatcher --log_batch/end_run--> Transport --> server
                             |  jobs (uploads) ---------> JobContext (this engine)
                             v
                           Ledger  <-- stats(), flush()'s rejections

Callers use this class; the worker's thread runs :class:`~asynctrack._engine.loop.Delivery`
(the intake and the pump). Jobs (uploads) see the engine as their :class:`JobContext`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import enum
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from asynctrack._engine.events import Event, end_event
from asynctrack._engine.intake import Intake
from asynctrack._engine.jobs import Resources
from asynctrack._engine.kept import Kept
from asynctrack._engine.ledger import Ledger
from asynctrack._engine.loop import LIVE_RETRY, WINDOW, Delivery
from asynctrack._engine.queue import EventQueue
from asynctrack._engine.stats import FileCounters, Stats
from asynctrack._engine.threads import DaemonPool
from asynctrack._engine.transport import RestTransport, Transport, make_transport, redact
from asynctrack._engine.worker import Worker
from asynctrack.config import EngineConfig
from asynctrack.errors import (
    AccessDeniedError,
    DeliveryError,
    EngineClosedError,
    FlushTimeoutError,
    KeptEvents,
)

logger = logging.getLogger("asynctrack")

T = TypeVar("T")


class State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class Engine:
    #: For jobs (uploads): transient failures are retried as long as the process lives.
    retry = LIVE_RETRY

    def __init__(
        self,
        tracking_uri: str,
        config: EngineConfig,
        transport_factory: Callable[[str, float], Transport] = make_transport,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.config = config
        self._transport_factory = transport_factory
        self._lock = threading.Lock()
        self.queue = EventQueue(config, self._start, self._wake, self._drop, self._full_message)
        self._fresh()

    def _fresh(self) -> None:
        """State of a new engine: at construction, and in a forked child (the parent's
        events, spool and uploads stay the parent's)."""
        self.state = State.UNOPENED
        self.ledger = Ledger()
        self.kept = Kept()  # what the server held back (credentials, permissions)
        self.worker = Worker()
        self.intake = Intake(self.queue, None, WINDOW)  # replaced when the worker starts
        self.resources = Resources()
        #: The blocking calls of jobs: set by the worker's loop while it runs.
        self.io_pool: DaemonPool | None = None
        self._delivery: Delivery | None = None
        self._transport: Transport | None = None

    def after_fork(self) -> None:
        if self.intake.writer is not None:
            self.intake.writer.forget()
        self._lock = threading.Lock()  # a parent's thread may have held it while forking
        self.worker.forget()
        self.queue.clear()
        self._fresh()

    def __repr__(self) -> str:
        return f"Engine({redact(self.tracking_uri)!r}, state={self.state.value})"

    # ------------------------------------------------------------------ callers' side

    def put(self, event: Event) -> None:
        """Queue one event and return (the hot path; see ``EventQueue.put``)."""
        self.queue.put(event)

    @property
    def open(self) -> bool:
        return self.queue.open

    def pending(self) -> int:
        """Events accepted and not yet stored or refused (flush barriers are not events)."""
        return self.queue.waiting() + self.ledger.held

    def start(self) -> None:
        """Start the worker now if it is not running (raises EngineClosedError after
        exit): its spool directory exists once this returns."""
        if not self.open:
            self._start()

    def spool_dir(self) -> str:
        writer = self.intake.writer
        return str(writer.directory) if writer is not None else ""

    def spooled(self) -> int:
        """Events in the spool not yet stored."""
        return self.intake.waiting

    @property
    def files(self) -> FileCounters:
        return self.ledger.files

    def stats(self) -> Stats:
        writer = self.intake.writer
        stats = self.ledger.stats(
            queued=self.pending(),
            spooled=self.intake.waiting,
            spool_bytes=writer.total_bytes if writer else 0,
            durable=self.intake.durable,
            kept=self.kept.events,
        )
        transport = self._transport
        routed = transport.mlflow_path() if isinstance(transport, RestTransport) else {}
        return dataclasses.replace(stats, mlflow_path=routed) if routed else stats

    def last_error(self) -> str:
        return self.intake.error or self.ledger.last_error

    def end_run(self, run_id: str, status: str, timeout: float | None = None) -> None:
        """Store the run's queued events, then set its status; raise what was refused."""
        self.put(end_event(run_id, status))
        self.flush(timeout, run_id=run_id)

    def flush(
        self, timeout: float | None = None, run_id: str | None = None, report: bool = True
    ) -> None:
        """Block until everything queued before the call is stored or refused.

        ``timeout=None`` waits as long as the server makes progress: FlushTimeoutError once
        ``flush_timeout`` seconds pass with nothing stored or refused (a fleet draining for
        65 s is not cut off at 60). A number is a fixed deadline; ``math.inf`` waits
        forever. Then, if ``report``, DeliveryError for events refused since the last flush
        (only ``run_id``'s, when given); otherwise they wait for the next flush.
        """
        limit = self.config.flush_timeout if timeout is None else timeout
        self._flush(limit, timeout is None, run_id, report)

    def _flush(self, limit: float, progressing: bool, run_id: str | None, report: bool) -> None:
        if self.state is State.OPEN:
            barrier = self.queue.barrier()
            if not self._wait(barrier.future, limit, progressing):
                pending = self.pending()
                since = " without progress" if progressing else ""
                raise FlushTimeoutError(
                    f"flush timed out after {limit} s{since} with {pending} event(s) not yet "
                    f"stored at {redact(self.tracking_uri)}{self._cause()}; they stay queued",
                    pending,
                )
        if not report:
            return
        rejected = self.ledger.take_rejections(run_id)
        kept = self.kept_events(run_id)
        if kept:  # the server answered: no use waiting out the deadline
            raise AccessDeniedError(rejected, kept)
        if rejected:
            raise DeliveryError(rejected)

    def kept_events(self, run_id: str | None = None) -> list[KeptEvents]:
        """What the server holds back now (of ``run_id``, when given), for messages."""
        kept = self.kept
        count = kept.events if run_id is None else kept.by_run.get(run_id, 0)
        if not count:
            return []
        reason = kept.reason if run_id is None else kept.reason_of(run_id)
        where = self.spool_dir() if self.intake.writer is not None else ""
        return [KeptEvents(redact(self.tracking_uri), count, reason, where)]

    def _wait(
        self, future: concurrent.futures.Future[None], limit: float, progressing: bool
    ) -> bool:
        """Whether ``future`` resolved within ``limit`` seconds (of no progress, if
        ``progressing``)."""
        if math.isinf(limit):
            future.result()
            return True
        ledger = self.ledger
        deadline, seen = time.monotonic() + limit, ledger.sent + ledger.rejected + ledger.done
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                future.result(min(remaining, 1.0) if progressing else remaining)
                return True
            except concurrent.futures.TimeoutError:  # the built-in TimeoutError from 3.11
                if not progressing:
                    return False
            settled = ledger.sent + ledger.rejected + ledger.done
            if settled != seen:  # the server is storing: the deadline moves on
                seen, deadline = settled, time.monotonic() + limit

    def close(self, timeout: float) -> int:
        """Send what is queued, then stop; return what is left. Stops once ``timeout``
        seconds pass with nothing stored: a fleet draining slowly but surely at exit is
        not cut off, and a server that stopped answering holds the exit that long at most.

        With a spool, part of the deadline is kept to write what is left to it: those
        events stay there for ``asynctrack sync``.
        """
        with self._lock:
            if self.state is not State.OPEN:
                self.state = State.CLOSED
                return 0
        reserve = min(1.0, timeout / 5) if self.intake.writer is not None else 0.0
        with contextlib.suppress(FlushTimeoutError, DeliveryError):
            self._flush(timeout - reserve, progressing=True, run_id=None, report=True)
        with self._lock:
            self.state = State.CLOSED
            self.queue.open = False
        delivery = self._delivery
        if self.intake.writer is not None and delivery is not None:
            with contextlib.suppress(Exception):
                self.worker.run(delivery.close_spool(), reserve)
        left = self.pending()
        self.worker.stop(join=1.0)
        return left

    def _start(self) -> None:
        with self._lock:
            if self.state is State.OPEN:
                return
            if self.state is State.CLOSED:
                raise EngineClosedError(
                    "asynctrack has shut down (interpreter exit); event not logged"
                )
            # Built here, so a tracking URI it cannot serve fails the first call, loudly.
            transport = self._transport_factory(self.tracking_uri, self.config.request_timeout)
            self._transport = transport
            delivery = self._delivery = Delivery(self, transport)
            self.worker.start(delivery.run)
            self.state = State.OPEN
            self.queue.open = True

    def _wake(self) -> None:
        """A flush or a full queue: take and send now, not at the next poll."""
        delivery = self._delivery
        if delivery is not None:
            delivery.wake(self.worker)

    def _drop(self, reason: str) -> None:
        if self.ledger.drop(reason):  # named once; counted in stats() and the exit summary
            sys.stderr.write(
                f"asynctrack: {redact(self.tracking_uri)}: {reason}{self._cause()}; dropped "
                "events are counted in asynctrack.stats().dropped\n"
            )

    def _full_message(self) -> str:
        return (
            f"asynctrack queue full ({self.queue.capacity} events) for "
            f"{redact(self.tracking_uri)}; the server is not keeping up{self._cause()}"
        )

    def _cause(self) -> str:
        error = self.last_error()  # a failing spool explains a full queue
        return f" (last error: {error})" if error else ""

    # ------------------------------------------------------------------ jobs' context

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """For jobs: run a blocking call on a daemon thread (never the metric senders')."""
        assert self.io_pool is not None, "jobs run on the worker"
        return await self.io_pool.run(fn)

    def note_transient(self, reason: str) -> None:
        """For jobs: remember why a retry happened, for timeout and exit messages."""
        self.ledger.last_error = reason
