"""What runs on an engine's worker thread: taking from the callers' queue, and delivering.

Two tasks run on the worker's loop: the intake, which takes what is queued every 50 ms
(at once when a flush or a full queue wakes it) and never waits for the server, and the
pump, which feeds the dispatcher. The pump may wait for the server; the intake never does,
so callers find room while the sender is stuck, and the spool takes what memory cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Protocol

from asynctrack._engine import spool
from asynctrack._engine.dispatcher import Dispatcher
from asynctrack._engine.intake import Intake, report_orphans
from asynctrack._engine.jobs import JobContext
from asynctrack._engine.kept import Kept
from asynctrack._engine.ledger import Ledger
from asynctrack._engine.limiter import limiter_for
from asynctrack._engine.queue import EventQueue
from asynctrack._engine.retry import RetryPolicy
from asynctrack._engine.threads import DaemonPool
from asynctrack._engine.transport import RestTransport, Transport, redact
from asynctrack._engine.worker import Worker

logger = logging.getLogger("asynctrack")

_POLL = 0.05  # seconds between looks at the queue's length
# Events held in memory for sending beyond the queue; past it, they wait in the spool.
# Large enough that a burst the server clears in seconds never goes through the disk.
WINDOW = 100_000
SEGMENT_BYTES = 8 * 1024 * 1024
#: Live sending retries as long as the process lives; the exit deadline cuts it short.
LIVE_RETRY = RetryPolicy(first=0.25, maximum=8.0)


class Host(JobContext, Protocol):
    """What the worker's side uses of its engine (which is also its jobs' context)."""

    queue: EventQueue
    ledger: Ledger
    kept: Kept
    intake: Intake  # set here, read by callers (stats, spool)
    io_pool: DaemonPool | None  # set here, for the jobs' blocking calls


class Delivery:
    """One engine's worker-side life: built by the engine as it starts, run by its worker."""

    def __init__(self, engine: Host, transport: Transport) -> None:
        self._engine, self._transport = engine, transport
        self._urgent = False
        self._wake_event: asyncio.Event | None = None

    def wake(self, worker: Worker) -> None:
        """From any thread: take and send now, not at the next poll."""
        self._urgent = True
        wake = self._wake_event
        if wake is not None:
            worker.call_soon(wake.set)

    async def run(self, started: threading.Event) -> None:
        engine, transport, config = self._engine, self._transport, self._engine.config
        self._wake_event = wake = asyncio.Event()
        writer = self._open_spool()
        # Without a spool the window is memory on top of the queue: keep it as bounded.
        window = WINDOW if writer is not None else min(WINDOW, engine.queue.capacity)
        engine.intake = intake = Intake(engine.queue, writer, window)
        engine.io_pool = io_pool = DaemonPool(4, "asynctrack-io")
        limiter = (
            limiter_for(engine.tracking_uri, config.max_in_flight)
            if engine.tracking_uri.startswith(("http://", "https://"))
            else None  # a local store: one writer, nothing to adapt to
        )
        if limiter is not None and isinstance(transport, RestTransport):
            transport.limiter = limiter
        dispatcher = Dispatcher(
            intake, transport, engine.ledger, engine, config.max_in_flight, LIVE_RETRY,
            limiter, engine.kept,
        )  # fmt: skip
        pump = _Pump(dispatcher)
        pumping = asyncio.get_running_loop().create_task(pump.run())
        started.set()
        loop, syncing = asyncio.get_running_loop(), None
        try:
            poll, last = min(_POLL, config.flush_interval), time.monotonic()
            while True:
                with contextlib.suppress(asyncio.TimeoutError):  # built-in from 3.11
                    await asyncio.wait_for(wake.wait(), poll)
                wake.clear()
                self.take()
                intake.write_marks(now=False)  # what settled since the last pump pass
                if (syncing is None or syncing.done()) and intake.sync_due(
                    config.spool_sync_interval
                ):
                    # Not awaited: an fsync can take a second on a busy disk, and taking
                    # from the callers' queue must go on meanwhile.
                    syncing = loop.create_task(engine.run_blocking(intake.sync))
                due = (
                    self._urgent
                    or intake.barrier_taken
                    or time.monotonic() - last >= config.flush_interval
                )
                if due or intake.full or intake.backlog is not None:
                    self._urgent = intake.barrier_taken = False
                    pump.wake(due)
                    if due:
                        last = time.monotonic()
        finally:
            pumping.cancel()
            dispatcher.close()
            io_pool.close()
            with contextlib.suppress(Exception):
                await engine.resources.exit_stack.aclose()

    def take(self, everything: bool = False) -> None:
        """From the callers' queue to the intake (``everything``: past the window too)."""
        intake, ledger = self._engine.intake, self._engine.ledger
        ledger.took(intake.pull(everything))
        if intake.refused:  # values that could not be converted, taken out of their chunk
            refused, intake.refused = intake.refused, []
            ledger.took(len(refused))
            ledger.refused(refused)

    def _open_spool(self) -> spool.Writer | None:
        engine, transport, config = self._engine, self._transport, self._engine.config
        if not config.spool:
            return None
        root = Path(config.spool_dir) if config.spool_dir else spool.default_root()
        routed = transport.routed if isinstance(transport, RestTransport) else None
        try:
            writer = spool.Writer(
                root, redact(engine.tracking_uri), SEGMENT_BYTES, config.spool_limit,
                mlflow_path=routed,
            )  # fmt: skip
        except spool.SpoolError as exc:
            logger.warning("asynctrack: %s; events are kept in memory only until stored", exc)
            return None
        try:
            report_orphans(root, config.spool_recover)
        except OSError as exc:  # another user's unreadable directory in a shared root
            logger.warning("asynctrack: cannot look for spools left in %s: %s", root, exc)
        return writer

    async def close_spool(self) -> None:
        """At exit: everything still queued goes to the spool, made durable."""
        self.take(everything=True)
        intake = self._engine.intake
        await self._engine.run_blocking(intake.sync)
        intake.close()


class _Pump:
    """Feeds the dispatcher when the intake says so; one pass at a time."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._event = asyncio.Event()
        self._due = False

    def wake(self, due: bool) -> None:
        self._due |= due
        self._event.set()

    async def run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            due, self._due = self._due, False
            try:
                await self._dispatcher.pump(due)
            except Exception:  # a bug must not kill the worker: log it, keep going
                logger.exception("asynctrack worker error")
