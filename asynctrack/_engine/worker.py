"""The engine: a bounded queue, one worker thread with an event loop, and flush barriers.

Callers append events to a ``deque`` (thread-safe, about 40 ns) and return; they never
signal the worker, because waking another thread costs more than the call itself. Every
50 ms the worker's intake (``intake.py``) takes what is queued into the spool and its
in-memory window; a separate pump task batches from the window and sends when a batch is
full, when the flush interval has passed, or at once when ``flush()`` or a full queue
wakes it. The pump may wait for the server; the intake never does.

Metric batches go out up to ``max_in_flight`` at a time: the server stores about twice as
much with calls in flight, and metrics carry their own step and timestamp, so their order
between requests does not matter. Params, tags and a run's end go through one lane per run,
in order, so the last ``set_tag`` wins. A run's end and every flush are barriers: all that
was queued before them is stored (or refused) first.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from asynctrack._engine import spool
from asynctrack._engine.batching import MAX_METRICS, pack_meta
from asynctrack._engine.events import Barrier, Event, Job, MetaEvent, Metric, now_ms
from asynctrack._engine.intake import Intake
from asynctrack._engine.stats import Stats
from asynctrack._engine.threads import DaemonPool
from asynctrack._engine.transport import Refused, Transient, Transport, make_transport, redact
from asynctrack.config import EngineConfig
from asynctrack.errors import (
    DeliveryError,
    EngineClosedError,
    FlushTimeoutError,
    QueueFullError,
    Rejection,
)

logger = logging.getLogger("asynctrack")

T = TypeVar("T")

_POLL = 0.05  # seconds between looks at the queue's length
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 8.0
# Events held in memory for sending beyond the queue; past it, they wait in the spool.
# Large enough that a burst the server clears in seconds never goes through the disk.
_WINDOW = 100_000
_SEGMENT_BYTES = 8 * 1024 * 1024


class State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class Engine:
    """Everything logged to one tracking URI in this process goes through one Engine."""

    def __init__(
        self,
        tracking_uri: str,
        config: EngineConfig,
        transport_factory: Callable[[str, float], Transport] = make_transport,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.config = config
        self._transport_factory = transport_factory
        self._reset()

    def _reset(self) -> None:
        """Fresh state: at construction, and in a forked child (the parent's events stay
        the parent's, and so does its spool)."""
        intake: Intake | None = getattr(self, "_intake", None)
        if intake is not None and intake.writer is not None:
            intake.writer.forget()
        self._intake = Intake(deque(), None, _WINDOW)  # replaced when the worker starts
        self._buf: deque[Event] = deque()
        self._capacity = self.config.queue_capacity
        self._lock = threading.Lock()
        self._room = threading.Condition(threading.Lock())
        self.state = State.UNOPENED
        self.open = False  # read on the hot path: a plain attribute, not the enum
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._urgent = False
        self._rejections: list[Rejection] = []
        self._last_error = ""
        # Counters, written by the worker thread only (dropped: under self._lock).
        self._held = 0  # taken off the queue, not yet stored or refused
        self._barriers = 0  # flush barriers in the queue
        self._sent = self._retried = self._rejected = self._dropped = 0
        self._batches = self._in_flight = 0

    def __repr__(self) -> str:
        return f"Engine({redact(self.tracking_uri)!r}, state={self.state.value})"

    # ------------------------------------------------------------------ callers' side

    def put(self, event: Event) -> None:
        """The hot path: queue one event and return."""
        if self.open and len(self._buf) < self._capacity:
            self._buf.append(event)
            return
        self._put_slow(event)

    def _put_slow(self, event: Event) -> None:
        if not self.open:
            self._start()
        # Barriers and jobs (staged files on disk, already counted) always get in.
        if len(self._buf) < self._capacity or isinstance(event, (Barrier, Job)):
            self._buf.append(event)
            return
        policy = self.config.full_policy
        if policy == "drop":
            with self._lock:
                self._dropped += 1
            return
        self._urgent = True
        self._wake_worker()
        if policy == "raise":
            raise QueueFullError(self._full_message())
        deadline = time.monotonic() + self.config.flush_timeout
        with self._room:
            while len(self._buf) >= self._capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueFullError(self._full_message())
                self._room.wait(min(remaining, _POLL))
        self._buf.append(event)

    def _full_message(self) -> str:
        return (
            f"asynctrack queue full ({self._capacity} events) for {redact(self.tracking_uri)}; "
            f"the server is not keeping up{self._cause()}"
        )

    def _cause(self) -> str:
        error = self._intake.error or self._last_error  # a failing spool explains a full queue
        return f" (last error: {error})" if error else ""

    def pending(self) -> int:
        """Events accepted and not yet stored or refused (flush barriers are not events)."""
        return len(self._buf) - self._barriers + self._held

    def spool_dir(self) -> str:
        """Where this engine's spool is (empty without one)."""
        writer = self._intake.writer
        return str(writer.directory) if writer is not None else ""

    def spooled(self) -> int:
        """Events in the spool not yet stored."""
        return self._intake.waiting

    def stats(self) -> Stats:
        from asynctrack._engine.stats import file_counters  # artifact uploads count apart

        return Stats(
            queued=self.pending(),
            sent=self._sent,
            retried=self._retried,
            rejected=self._rejected,
            dropped=self._dropped,
            batches_sent=self._batches,
            in_flight=self._in_flight,
            spooled=self._intake.waiting,
            spool_bytes=self._intake.writer.total_bytes if self._intake.writer else 0,
            durable=self._intake.durable,
            **file_counters(self).snapshot(),
        )

    def end_run(self, run_id: str, status: str, timeout: float | None = None) -> None:
        """Store the run's queued events, then set its status; raise what was refused."""
        self.put(MetaEvent("end", run_id, "status", status))
        self.flush(timeout, run_id=run_id)

    def flush(
        self, timeout: float | None = None, run_id: str | None = None, report: bool = True
    ) -> None:
        """Block until everything queued before the call is stored or refused.

        Raises FlushTimeoutError at the deadline (``None``: the configured flush_timeout,
        ``math.inf``: none), then, if ``report``, DeliveryError for events refused since the
        last flush (only ``run_id``'s, when given); otherwise they wait for the next flush.
        """
        if self.state is State.OPEN:
            barrier = Barrier()
            self._barriers += 1
            self.put(barrier)
            self._urgent = True
            self._wake_worker()
            limit = self.config.flush_timeout if timeout is None else timeout
            try:
                barrier.future.result(None if math.isinf(limit) else limit)
            except TimeoutError:
                pending = self.pending()
                raise FlushTimeoutError(
                    f"flush timed out after {limit} s with {pending} event(s) not yet stored "
                    f"at {redact(self.tracking_uri)}{self._cause()}; they stay queued",
                    pending,
                ) from None
        rejected = self._take_rejections(run_id) if report else []
        if rejected:
            raise DeliveryError(rejected)

    def _take_rejections(self, run_id: str | None) -> list[Rejection]:
        with self._lock:
            taken = [r for r in self._rejections if run_id is None or r.run_id == run_id]
            self._rejections = [r for r in self._rejections if r not in taken]
        return taken

    def close(self, timeout: float) -> int:
        """Send what is queued within ``timeout`` seconds, then stop; return what is left.

        With a spool, part of the deadline is kept to write what is left to it: those
        events stay there for ``asynctrack sync``.
        """
        with self._lock:
            if self.state is not State.OPEN:
                self.state = State.CLOSED
                return 0
        reserve = min(1.0, timeout / 5) if self._intake.writer is not None else 0.0
        with contextlib.suppress(FlushTimeoutError, DeliveryError):
            self.flush(timeout - reserve)
        with self._lock:
            self.state = State.CLOSED
            self.open = False
        loop, task = self._loop, self._main_task
        if loop is not None and self._intake.writer is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close_spool(), loop).result(reserve)
        left = self.pending()
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(1.0)
        return left

    def last_error(self) -> str:
        return self._last_error

    # ------------------------------------------------------------------ worker thread

    def _start(self) -> None:
        with self._lock:
            if self.state is State.OPEN:
                return
            if self.state is State.CLOSED:
                raise EngineClosedError(
                    "asynctrack has shut down (interpreter exit); event not logged"
                )
            # Built here, so a tracking URI it cannot serve fails the first call, loudly.
            self._transport = self._transport_factory(
                self.tracking_uri, self.config.request_timeout
            )
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(started,), name="asynctrack-worker", daemon=True
            )
            self._thread.start()
            started.wait()
            self.state = State.OPEN
            self.open = True

    def _wake_worker(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(wake.set)

    def _run(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._main_task = loop.create_task(self._main(started))
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._main_task)
            # As asyncio.run does: cancel what is left (sends retrying against a dead
            # server at exit) and let it unwind, so no "Task was destroyed" warnings.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:  # gather() of nothing looks for the thread's loop, and there is none
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        finally:
            loop.close()

    def _open_spool(self) -> spool.Writer | None:
        if not self.config.spool:
            return None
        root = Path(self.config.spool_dir) if self.config.spool_dir else spool.default_root()
        try:
            writer = spool.Writer(
                root, redact(self.tracking_uri), _SEGMENT_BYTES, self.config.spool_limit
            )
        except spool.SpoolError as exc:
            logger.warning("asynctrack: %s; events are kept in memory only until stored", exc)
            return None
        from asynctrack._engine.intake import report_orphans

        report_orphans(root, self.config.spool_recover)
        return writer

    async def _close_spool(self) -> None:
        """At exit: everything still queued goes to the spool, made durable."""
        self._pull(everything=True)
        await self.run_blocking(self._intake.sync)
        self._intake.close()

    def _pull(self, everything: bool = False) -> None:
        intake = self._intake
        taken, barriers = intake.taken, intake.barriers
        intake.pull(everything)
        self._held += intake.taken - taken
        self._barriers -= intake.barriers - barriers
        if intake.refused:  # values that could not be converted, taken out of their chunk
            refused, intake.refused = intake.refused, []
            self._held += len(refused)
            self._refuse(refused, 0)
        with self._room:
            self._room.notify_all()

    async def _main(self, started: threading.Event) -> None:
        self._wake = asyncio.Event()
        writer = self._open_spool()
        # Without a spool the window is memory on top of the queue: keep it as bounded.
        window = _WINDOW if writer is not None else min(_WINDOW, self._capacity)
        self._intake = Intake(self._buf, writer, window)
        self._batch_seg = self._intake.writer.segment if self._intake.writer else 0
        self._pump_wake = asyncio.Event()
        self._pump_due = False
        self._pool = DaemonPool(self.config.max_in_flight + 1, "asynctrack-send")
        self._slots = asyncio.Semaphore(self.config.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._run_locks: dict[str, asyncio.Lock] = {}
        self._metrics: dict[str, list[Metric]] = {}
        self._meta: dict[str, list[MetaEvent]] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._io_pool = DaemonPool(4, "asynctrack-io")
        #: Per-worker state for jobs (an S3 client, say), closed when the worker stops.
        self.resources: dict[str, Any] = {}
        self.exit_stack = contextlib.AsyncExitStack()
        pumper = asyncio.get_running_loop().create_task(self._pumper())
        started.set()
        intake = self._intake
        try:
            poll = min(_POLL, self.config.flush_interval)
            last = time.monotonic()
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll)
                self._wake.clear()
                # Taking never waits for the server, so callers find room while the
                # sender is stuck; the spool takes what memory cannot.
                self._pull()
                if intake.sync_due(self.config.spool_sync_interval):
                    await self.run_blocking(intake.sync)
                due = self._urgent or time.monotonic() - last >= self.config.flush_interval
                if due or intake.mem_events >= MAX_METRICS or intake.backlog is not None:
                    self._urgent = False
                    self._pump_due |= due
                    self._pump_wake.set()
                    if due:
                        last = time.monotonic()
        finally:
            pumper.cancel()
            self._pool.close()
            self._io_pool.close()
            with contextlib.suppress(Exception):
                await self.exit_stack.aclose()

    async def _pumper(self) -> None:
        while True:
            await self._pump_wake.wait()
            self._pump_wake.clear()
            due, self._pump_due = self._pump_due, False
            try:
                await self._pump(due)
            except Exception:  # a bug must not kill the worker: log it, keep going
                logger.exception("asynctrack worker error")

    async def _pump(self, due: bool) -> None:
        intake = self._intake
        while True:
            if not intake.mem:
                intake.read_backlog()
                if not intake.mem:
                    break
            segment, chunk = intake.mem.popleft()
            intake.mem_events -= len(chunk)
            if segment != self._batch_seg:
                # every partial batch belongs to one spool segment, acknowledged as a whole
                await self._dispatch_all()
                self._batch_seg = segment
            for event in chunk:
                if type(event) is tuple:
                    batch = self._metrics.setdefault(event[0], [])
                    batch.append(event)
                    if len(batch) >= MAX_METRICS:
                        del self._metrics[event[0]]
                        await self._dispatch_metrics(event[0], batch)
                elif isinstance(event, MetaEvent):
                    if event.kind == "end":
                        await self._settle()
                        await self._end_run(event)
                    else:
                        self._meta.setdefault(event.run_id, []).append(event)
                elif isinstance(event, Job):
                    self._start_job(event)
                elif isinstance(event, Barrier):
                    await self._settle()
                    event.future.set_result(None)
            # Between chunks (256 events), the loop's select() releases the GIL for the
            # training loop, which waits for it when it comes back from numpy or torch.
            await asyncio.sleep(0)
        if due:
            await self._dispatch_all()

    async def _settle(self) -> None:
        """Send every partial batch and wait until all requests are done."""
        await self._dispatch_all()
        while self._tasks or self._jobs:
            await asyncio.gather(*self._tasks, *self._jobs)

    async def _dispatch_all(self) -> None:
        segment = self._batch_seg
        metrics, self._metrics = self._metrics, {}
        for run_id, batch in metrics.items():
            await self._dispatch_metrics(run_id, batch)
        meta, self._meta = self._meta, {}
        for run_id, events in meta.items():
            batches = pack_meta(run_id, events)
            # events folded into others (a tag set twice, a param repeated) count as stored
            folded = len(events) - sum(len(b) for b in batches)
            self._held -= folded
            self._sent += folded
            self._intake.ack(segment, folded)
            for meta_batch in batches:
                await self._spawn(self._send_meta(run_id, meta_batch.events(), segment))

    async def _dispatch_metrics(self, run_id: str, batch: list[Metric]) -> None:
        await self._spawn(self._send_metrics(run_id, batch, self._batch_seg))

    async def _spawn(self, coro: Any) -> None:
        try:
            await self._slots.acquire()  # back-pressure: at most max_in_flight requests
        except BaseException:  # cancelled at exit: the request is never made
            coro.close()
            raise
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            logger.error("asynctrack send failed", exc_info=task.exception())

    def _start_job(self, job: Job) -> None:
        task = asyncio.get_running_loop().create_task(self._run_job(job, self._batch_seg))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _run_job(self, job: Job, segment: int) -> None:
        try:
            await job.work(self)
        except Exception as exc:  # reported at the next flush, named by the job's label
            reason = str(exc) or repr(exc)
            self._intake.note_done(job)
            self._refuse([Rejection(job.run_id, job.kind, job.label, reason)], segment)
        else:
            self._held -= 1
            self._intake.note_done(job)
            self._intake.ack(segment, 1)

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """For jobs: run a blocking call on a daemon thread (never the metric senders')."""
        return await self._io_pool.run(fn)

    def note_transient(self, reason: str) -> None:
        """For jobs: remember why a retry happened, for timeout and exit messages."""
        self._last_error = reason

    async def _send_metrics(self, run_id: str, batch: Sequence[Metric], segment: int) -> None:
        refused = await self._attempt(
            len(batch), lambda: self._transport.log_batch(run_id, batch, (), ())
        )
        if refused is None:
            self._stored(len(batch), segment)
        elif refused.splittable and len(batch) > 1:
            half = len(batch) // 2
            await self._send_metrics(run_id, batch[:half], segment)
            await self._send_metrics(run_id, batch[half:], segment)
        else:
            reason = refused.reason
            self._refuse([Rejection(run_id, "metric", m[1], reason) for m in batch], segment)

    async def _send_meta(self, run_id: str, events: Sequence[MetaEvent], segment: int) -> None:
        lock = self._run_locks.setdefault(run_id, asyncio.Lock())
        async with lock:  # FIFO: batches of one run land in the order they were made
            await self._send_meta_unlocked(run_id, events, segment)

    async def _send_meta_unlocked(
        self, run_id: str, events: Sequence[MetaEvent], segment: int
    ) -> None:
        params = [(e.key, e.value) for e in events if e.kind == "param"]
        tags = [(e.key, e.value) for e in events if e.kind == "tag"]
        refused = await self._attempt(
            len(events), lambda: self._transport.log_batch(run_id, (), params, tags)
        )
        if refused is None:
            self._stored(len(events), segment)
        elif refused.splittable and len(events) > 1:
            half = len(events) // 2
            await self._send_meta_unlocked(run_id, events[:half], segment)
            await self._send_meta_unlocked(run_id, events[half:], segment)
        else:
            reason = refused.reason
            self._refuse([Rejection(run_id, e.kind, e.key, reason) for e in events], segment)

    async def _end_run(self, event: MetaEvent) -> None:
        run_id, status, segment = event.run_id, event.value, self._batch_seg
        refused = await self._attempt(1, lambda: self._transport.end_run(run_id, status, now_ms()))
        self._run_locks.pop(run_id, None)
        if refused is None:
            self._held -= 1
            self._intake.ack(segment, 1)
        else:
            self._refuse([Rejection(run_id, "run", "status", refused.reason)], segment)

    async def _attempt(self, count: int, call: Callable[[], None]) -> Refused | None:
        """Send until stored or refused, backing off with jitter while the server is away."""
        delay = _BACKOFF_FIRST
        while True:
            self._in_flight += 1
            try:
                await self._pool.run(call)
                return None
            except Transient as exc:
                self._last_error = str(exc)
                self._retried += count
            except Refused as exc:
                return exc
            except Exception as exc:  # it cannot be encoded (or a bug): refuse it alone
                return Refused(f"not sent: {type(exc).__name__}: {exc}", splittable=True)
            finally:
                self._in_flight -= 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, _BACKOFF_MAX)

    def _stored(self, count: int, segment: int) -> None:
        self._held -= count
        self._sent += count
        self._batches += 1
        self._intake.ack(segment, count)

    def _refuse(self, rejections: list[Rejection], segment: int) -> None:
        self._held -= len(rejections)
        self._rejected += len(rejections)
        self._intake.ack(segment, len(rejections))
        self._last_error = rejections[0].reason
        with self._lock:
            self._rejections.extend(rejections)
        for rejection in rejections[:5]:
            logger.warning("asynctrack: server refused %s", rejection)
