"""The dispatcher: every rule of delivery, for the live worker and ``asynctrack sync`` alike.

It takes chunks of events from a :class:`Source` (the live intake's window, or a dead
process's spool segments) and turns them into requests:

- metrics are batched per run, 1000 a call, several calls at once: the server stores about
  twice as much with calls in flight, and metrics carry their own step and timestamp, so
  their order between requests does not matter. ``max_in_flight`` bounds the requests
  under way; within it, the server's :class:`~asynctrack._engine.limiter.Limiter` decides
  how many are sent at once (fewer while the server is slow or overloaded, none until its
  ``Retry-After`` has passed), per attempt, so a request waiting to be retried holds no slot;
- params and tags go through one lane per run, in order (``pack_meta``), so the last
  ``set_tag`` wins; repeats folded into one request count as stored;
- a run's end, a flush barrier and a job wait for everything before them;
- transient failures are retried (``RetryPolicy``); a refused request is split in half
  until the events at fault are alone, and those are refused, named by run and key;
- a request refused for credentials or a permission is parked (:mod:`.kept`): its events
  stay unsettled, and the live worker sends it again later with credentials resolved anew;
- a failed attempt of a tags request may still reach the server after its retry, and
  after newer values of its tags ("ghosts"): the keys are remembered, and before the run
  ends (and at a flush) the run's tags are read back and any stale ghosted one set again.

Every event taken is settled exactly once: stored or refused, in the :class:`Ledger`, and
acknowledged to its source, which may then forget it (a spool segment is deleted).
Requests settle in any order, so the source is also told how many chunks, counted from
the first, are settled as a whole (``settled``): each partial batch and request remembers
the first chunk it holds events of, and every chunk before the oldest of those is done.
Jobs are left out (an upload can take minutes; the source marks each one done itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from asynctrack._engine.batching import MAX_METRICS, pack_meta
from asynctrack._engine.events import Barrier, Job, MetaEvent, Metric, now_ms
from asynctrack._engine.jobs import JobContext
from asynctrack._engine.kept import Kept, Parked
from asynctrack._engine.ledger import Ledger
from asynctrack._engine.limiter import Limiter, Outcome
from asynctrack._engine.retry import GaveUp, RetryPolicy
from asynctrack._engine.threads import DaemonPool
from asynctrack._engine.transport import Held, KeyValue, Refused, Transient, Transport
from asynctrack.errors import Rejection

logger = logging.getLogger("asynctrack")


class Source(Protocol):
    def next_chunk(self) -> tuple[int, list[Any]] | None:
        """The next events in queueing order, with the spool segment they are in (0: none)."""

    def ack(self, segment: int, count: int) -> None:
        """``count`` events of ``segment`` are settled (stored or refused)."""

    def note_done(self, job: Job, segment: int, stored: bool) -> None:
        """``job`` is finished (``stored``, or refused): a sync must never redo it."""

    def settled(self, chunks: int, now: bool) -> None:
        """The first ``chunks`` chunks handed out are settled, their jobs aside; ``now``: a
        flush waits on it."""


class Dispatcher:
    def __init__(
        self,
        source: Source,
        transport: Transport,
        ledger: Ledger,
        jobs: JobContext | None,
        max_in_flight: int,
        policy: RetryPolicy,
        limiter: Limiter | None = None,
        kept: Kept | None = None,
        retry_kept: bool = True,
    ) -> None:
        self._source, self._transport, self._ledger, self._jobs = source, transport, ledger, jobs
        self._policy, self._limiter = policy, limiter
        #: Requests held back for credentials or a permission; sent again while
        #: ``retry_kept`` (the live worker), left on disk otherwise (``asynctrack sync``).
        self.kept = kept if kept is not None else Kept()
        self._retry_kept = retry_kept
        self._recovery: asyncio.Task[None] | None = None
        self._resends: set[asyncio.Task[None]] = set()
        self._senders = DaemonPool(max_in_flight + 1, "asynctrack-send")
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._lanes: dict[str, asyncio.Lock] = {}  # one per run: params, tags, end in order
        self._metrics: dict[str, list[Metric]] = {}
        self._meta: dict[str, list[MetaEvent]] = {}
        self._segment = 0  # every partial batch belongs to one segment, settled as a whole
        # For ``settled``: chunks taken whole, and the first chunk each partial batch (per
        # run) and each request holds events of.
        self._chunks = 0
        self._last: Any = None  # the current chunk's last event
        self._metrics_since: dict[str, int] = {}
        self._meta_since: dict[str, int] = {}
        self._requests: dict[asyncio.Task[None], int] = {}
        self._failure: BaseException | None = None  # a send that gave up (sync's deadline)
        # run -> tag key -> the last value stored by this process (None: not stored yet),
        # for the keys of meta requests with a failed attempt that may still land
        self._ghosts: dict[str, dict[str, str | None]] = {}

    @property
    def partial(self) -> int:
        """Events in batches not yet sent."""
        return sum(map(len, self._metrics.values())) + sum(map(len, self._meta.values()))

    async def pump(self, due: bool) -> None:
        """Batch everything the source has, sending full batches; partial ones too if due."""
        while (chunk := self._source.next_chunk()) is not None:
            segment, events = chunk
            if segment != self._segment:
                await self._dispatch_all()
                self._segment = segment
            self._last = events[-1] if events else None
            for event in events:
                await self._take(event)
            self._chunks += 1
            # Between chunks (256 events), the loop's select() releases the GIL for the
            # training loop, which waits for it when it comes back from numpy or torch.
            await asyncio.sleep(0)
        if due:
            await self._dispatch_all()
        self._report()

    async def _take(self, event: Any) -> None:
        if type(event) is tuple:
            run_id = event[0]
            batch = self._metrics.get(run_id)
            if batch is None:
                batch = self._metrics[run_id] = []
                self._metrics_since[run_id] = self._chunks
            batch.append(event)
            if len(batch) >= MAX_METRICS:
                del self._metrics[run_id]
                since = self._metrics_since.pop(run_id)
                await self._spawn(self._send_metrics(run_id, batch, self._segment, since), since)
        elif isinstance(event, MetaEvent):
            if event.kind == "end":
                await self.settle()
                await self._end_run(event, self._segment, self._chunks)
            else:
                if event.run_id not in self._meta:
                    self._meta[event.run_id] = []
                    self._meta_since[event.run_id] = self._chunks
                self._meta[event.run_id].append(event)
        elif isinstance(event, Job):
            job = self._run_job(event, self._segment, self._chunks)
            task = asyncio.get_running_loop().create_task(job)
            self._job_tasks.add(task)
            task.add_done_callback(self._job_tasks.discard)
        elif isinstance(event, Barrier):
            await self.settle()
            if self.kept and self._retry_kept:  # a flush asks for delivery now: one round
                await self._round()
            for run_id in list(self._ghosts):  # kept: a ghost may come later still
                await self._lay_ghosts(run_id)
            # everything before it is settled: its chunk too if nothing follows it there
            self._report(self._chunks + (event is self._last), now=True)
            event.future.set_result(None)

    async def settle(self) -> None:
        """Send every partial batch and wait until all requests and jobs are done."""
        await self._dispatch_all()
        while self._tasks or self._job_tasks or self._resends:
            await asyncio.gather(
                *self._tasks, *self._job_tasks, *self._resends, return_exceptions=True
            )
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
        self._senders.close()

    # ------------------------------------------------------------------ batches

    async def _dispatch_all(self) -> None:
        segment = self._segment
        metrics, self._metrics = self._metrics, {}
        since, self._metrics_since = self._metrics_since, {}
        for run_id, batch in metrics.items():
            first = since[run_id]
            await self._spawn(self._send_metrics(run_id, batch, segment, first), first)
        meta, self._meta = self._meta, {}
        since, self._meta_since = self._meta_since, {}
        for run_id, events in meta.items():
            batches = pack_meta(run_id, events)
            folded = len(events) - sum(len(b) for b in batches)  # a tag set twice, say
            self._ledger.stored(folded, request=False)
            self._source.ack(segment, folded)
            first = since[run_id]
            for meta_batch in batches:
                await self._spawn(
                    self._send_meta(run_id, meta_batch.events(), segment, first), first
                )

    async def _spawn(self, coro: Any, since: int) -> None:
        """Start a request (``since``: the first chunk it holds events of)."""
        try:
            await self._slots.acquire()  # back-pressure: at most max_in_flight requests
        except BaseException:  # cancelled at exit: the request is never made
            coro.close()
            raise
        if self._failure is not None:  # sync gave up on this server: send nothing more
            self._slots.release()
            coro.close()
            raise self._failure
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        self._requests[task] = since
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        error = None if task.cancelled() else task.exception()
        if not task.cancelled() and error is None:  # else its events are not settled
            self._requests.pop(task, None)
            self._report()
        if isinstance(error, GaveUp):  # sync's deadline: what is unsettled stays on disk
            self._failure = self._failure or error
        elif error is not None:  # a bug: say so, and keep the worker going
            logger.error("asynctrack send failed", exc_info=error)

    async def _send_metrics(
        self, run_id: str, batch: Sequence[Metric], segment: int, since: int
    ) -> None:
        call = self._blocking(lambda: self._transport.log_batch(run_id, batch, (), ()))
        refused = await self._attempt(len(batch), call)
        if refused is None:
            self._stored(len(batch), segment)
        elif isinstance(refused, Held):
            self._park(Parked(run_id, "metrics", batch, segment, since, refused.reason))
        elif refused.splittable and len(batch) > 1:
            half = len(batch) // 2
            await self._send_metrics(run_id, batch[:half], segment, since)
            await self._send_metrics(run_id, batch[half:], segment, since)
        else:
            reason = refused.reason
            self._refuse([Rejection(run_id, "metric", m[1], reason) for m in batch], segment)

    async def _send_meta(
        self, run_id: str, events: Sequence[MetaEvent], segment: int, since: int
    ) -> None:
        async with self._lanes.setdefault(run_id, asyncio.Lock()):  # FIFO: in logging order
            if self.kept.blocks(run_id):  # earlier params or tags wait: these go after them
                reason = self.kept.reason_of(run_id)
                self._park(Parked(run_id, "meta", events, segment, since, reason))
            else:
                await self._send_meta_in_lane(run_id, events, segment, since)

    async def _send_meta_in_lane(
        self, run_id: str, events: Sequence[MetaEvent], segment: int, since: int
    ) -> None:
        params = [(e.key, e.value) for e in events if e.kind == "param"]
        tags = [(e.key, e.value) for e in events if e.kind == "tag"]
        call = self._blocking(lambda: self._transport.log_batch(run_id, (), params, tags))
        refused = await self._attempt(len(events), call, lambda: self._haunt(run_id, tags))
        if refused is None:
            self._stored(len(events), segment)
            ghosts = self._ghosts.get(run_id)
            if ghosts:  # the normal path stops here: no run has ghosts
                ghosts.update((k, v) for k, v in tags if k in ghosts)
        elif isinstance(refused, Held):
            self._park(Parked(run_id, "meta", events, segment, since, refused.reason))
        elif refused.splittable and len(events) > 1:
            half = len(events) // 2
            await self._send_meta_in_lane(run_id, events[:half], segment, since)
            await self._send_meta_in_lane(run_id, events[half:], segment, since)
        else:
            reason = refused.reason
            self._refuse([Rejection(run_id, e.kind, e.key, reason) for e in events], segment)

    def _haunt(self, run_id: str, tags: Sequence[KeyValue]) -> None:
        """An attempt to store ``tags`` failed, so it may land yet, at any later time:
        unanswered, dropped, or answered with an error by a proxy the request went through."""
        if tags:
            ghosts = self._ghosts.setdefault(run_id, {})
            for key, _ in tags:
                ghosts.setdefault(key, None)

    async def _lay_ghosts(self, run_id: str) -> None:
        """Set again every ghosted tag the server holds with a value other than the last one
        this process stored (a late first attempt overwrote it)."""
        ghosts = self._ghosts[run_id]
        held: dict[str, str] = {}

        def read() -> None:
            held.update(self._transport.run_tags(run_id))

        if await self._attempt(0, self._blocking(read)) is not None:
            return  # the run is gone, say: its end (or nothing) reports that
        stale = [(k, v) for k, v in ghosts.items() if v is not None and k in held and held[k] != v]
        if stale:
            logger.info(
                "asynctrack: %d tag(s) of run %s overwritten late; set again", len(stale), run_id
            )
            call = self._blocking(lambda: self._transport.log_batch(run_id, (), (), stale))
            refused = await self._attempt(0, call, lambda: self._haunt(run_id, stale))
            if refused is not None:
                logger.warning(
                    "asynctrack: run %s: stale tags not set again: %s", run_id, refused.reason
                )

    async def _end_run(self, event: MetaEvent, segment: int, since: int) -> None:
        run_id, status = event.run_id, event.value
        if run_id in self.kept.by_run:  # a run ends after its events: they are held back
            reason = self.kept.reason_of(run_id)
            self._park(Parked(run_id, "end", [event], segment, since, reason))
            return
        if run_id in self._ghosts:
            await self._lay_ghosts(run_id)
            del self._ghosts[run_id]
        end_time = event.when or now_ms()
        call = self._blocking(lambda: self._transport.end_run(run_id, status, end_time))
        refused = await self._attempt(1, call)
        if isinstance(refused, Held):
            self._park(Parked(run_id, "end", [event], segment, since, refused.reason))
            return
        self._lanes.pop(run_id, None)
        if refused is None:
            self._ledger.completed(1)
            self._source.ack(segment, 1)
        else:
            self._refuse([Rejection(run_id, "run", "status", refused.reason)], segment)

    def _blocking(self, fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        return lambda: self._senders.run(fn)

    async def _attempt(
        self,
        count: int,
        call: Callable[[], Awaitable[None]],
        on_transient: Callable[[], None] | None = None,
    ) -> Refused | Held | None:
        async def counted() -> None:
            token = None if self._limiter is None else await self._limiter.acquire()
            outcome, retry_after = Outcome.OK, None  # a refusal is an answer like any other
            self._ledger.in_flight += 1
            try:
                await call()
            except Transient as exc:
                outcome, retry_after = exc.outcome, exc.retry_after
                raise
            finally:
                self._ledger.in_flight -= 1
                if token is not None:
                    token.done(outcome, retry_after=retry_after)

        def retrying(exc: Transient) -> None:
            self._ledger.retrying(count, str(exc))
            if on_transient is not None:
                on_transient()

        result = await self._policy.attempt(counted, retrying)
        return result if isinstance(result, (Refused, Held)) else None

    # ------------------------------------------------------------------ jobs and settling

    async def _run_job(self, job: Job, segment: int, since: int) -> None:
        try:
            if self._jobs is None:
                raise RuntimeError("no job context to run it in")
            await job.work(self._jobs)
        except GaveUp as exc:  # sync's deadline: the job stays on disk, for the next sync
            self._failure = self._failure or exc
        except Held as exc:  # credentials or a permission: the staged files stay
            self._park(Parked(job.run_id, "job", [job], segment, since, exc.reason))
        except Exception as exc:  # reported at the next flush, named by the job's label
            self._source.note_done(job, segment, stored=False)
            reason = str(exc) or repr(exc)
            self._refuse([Rejection(job.run_id, job.kind, job.label, reason)], segment)
        else:
            self._source.note_done(job, segment, stored=True)
            self._ledger.completed(1)
            self._source.ack(segment, 1)

    def _report(self, upto: int | None = None, now: bool = False) -> None:
        """Tell the source how many chunks, from the first, are settled."""
        low = self._chunks if upto is None else upto
        for pending in (self._metrics_since, self._meta_since, self._requests):
            if pending:
                low = min(low, min(pending.values()))
        parked = self.kept.since()
        self._source.settled(low if parked is None else min(low, parked), now)

    # ------------------------------------------------------------------ held back

    def _park(self, parked: Parked) -> None:
        first = not self.kept
        self.kept.park(parked)
        if first:
            logger.warning(
                "asynctrack: the server refused the credentials or a permission (%s); "
                "what it refused is kept and sent again%s",
                parked.reason,
                " while this process runs" if self._retry_kept else "",
            )
        if self._retry_kept and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """While something is parked: after a pause, resolve the credentials again and send
        every parked request again, each run's in order."""
        while self.kept:
            await asyncio.sleep(self.kept.next_pause())
            await self._round()

    async def _round(self) -> None:
        """Resolve the credentials again, then send every parked request again."""
        await self._senders.run(self._transport.refresh)
        before = self._ledger.sent + self._ledger.done + self._ledger.rejected
        loop = asyncio.get_running_loop()
        for parked in self.kept.take().values():
            task = loop.create_task(self._resend(parked))
            self._resends.add(task)
            task.add_done_callback(self._resends.discard)
        await asyncio.gather(*self._resends, return_exceptions=True)
        if self._ledger.sent + self._ledger.done + self._ledger.rejected != before:
            self.kept.delivered()
        self._report()

    async def _resend(self, requests: list[Parked]) -> None:
        """One run's parked requests, in order; once one is held back again, the rest are
        parked again as they are. The run's lane is held throughout, so its new params and
        tags wait behind these (and a flush or the run's end waits for the round)."""
        run_id = requests[0].run_id
        async with self._lanes.setdefault(run_id, asyncio.Lock()):
            for i, p in enumerate(requests):
                if run_id in self.kept.by_run:  # held back again
                    for rest in requests[i:]:
                        self.kept.park(rest)
                    return
                if p.kind == "metrics":
                    await self._send_metrics(run_id, p.events, p.segment, p.since)
                elif p.kind == "meta":
                    await self._send_meta_in_lane(run_id, p.events, p.segment, p.since)
                elif p.kind == "end":
                    await self._end_run(p.events[0], p.segment, p.since)
                else:
                    await self._run_job(p.events[0], p.segment, p.since)

    def _stored(self, count: int, segment: int) -> None:
        self._ledger.stored(count)
        self._source.ack(segment, count)

    def _refuse(self, rejections: list[Rejection], segment: int) -> None:
        self._ledger.refused(rejections)
        self._source.ack(segment, len(rejections))
