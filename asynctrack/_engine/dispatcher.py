"""The dispatcher: every rule of delivery, for the live worker and ``asynctrack sync`` alike.

It takes chunks of events from a :class:`Source` (the live intake's window, or a dead
process's spool segments) and turns them into requests (:mod:`.requests`; params, tags
and ends in :mod:`.lanes`; what the server holds back in :mod:`.kept` and
:mod:`.recovery`):

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
from typing import Any

from asynctrack._engine.batching import MAX_METRICS, pack_meta
from asynctrack._engine.events import Barrier, Job, MetaEvent, Metric
from asynctrack._engine.jobs import JobContext
from asynctrack._engine.kept import Kept, Parked
from asynctrack._engine.lanes import Lanes
from asynctrack._engine.ledger import Ledger
from asynctrack._engine.limiter import Limiter
from asynctrack._engine.recovery import Recovery
from asynctrack._engine.requests import Requests, Source
from asynctrack._engine.retry import GaveUp, RetryPolicy
from asynctrack._engine.transport import Held, Transport
from asynctrack.errors import Rejection

__all__ = ["Dispatcher", "Source"]

logger = logging.getLogger("asynctrack")


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
        self._source, self._ledger, self._jobs = source, ledger, jobs
        #: Requests held back for credentials or a permission; sent again while
        #: ``retry_kept`` (the live worker), left on disk otherwise (``asynctrack sync``).
        self.kept = kept if kept is not None else Kept()
        senders = max_in_flight + 1
        self._requests = Requests(source, transport, ledger, policy, limiter, self.kept, senders)
        self._lanes = Lanes(self._requests)
        self.recovery = Recovery(self._requests, self._lanes, self._run_job, self._report)
        self._retry_kept = retry_kept
        if retry_kept:
            self._requests.on_park = self.recovery.start
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._metrics: dict[str, list[Metric]] = {}
        self._meta: dict[str, list[MetaEvent]] = {}
        self._segment = 0  # every partial batch belongs to one segment, settled as a whole
        # For ``settled``: chunks taken whole, and the first chunk each partial batch (per
        # run) and each request holds events of.
        self._chunks = 0
        self._last: Any = None  # the current chunk's last event
        self._metrics_since: dict[str, int] = {}
        self._meta_since: dict[str, int] = {}
        self._in_flight: dict[asyncio.Task[None], int] = {}
        self._failure: BaseException | None = None  # a send that gave up (sync's deadline)

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
                send = self._requests.send_metrics(run_id, batch, self._segment, since)
                await self._spawn(send, since)
        elif isinstance(event, MetaEvent):
            if event.kind == "end":
                await self.settle()
                await self._lanes.end_run(event, self._segment, self._chunks)
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
                await self.recovery.round()
            await self._lanes.lay_all_ghosts()
            # everything before it is settled: its chunk too if nothing follows it there
            self._report(self._chunks + (event is self._last), now=True)
            event.future.set_result(None)

    async def settle(self) -> None:
        """Send every partial batch and wait until all requests and jobs are done."""
        await self._dispatch_all()
        resends = self.recovery.resends
        while self._tasks or self._job_tasks or resends:
            await asyncio.gather(*self._tasks, *self._job_tasks, *resends, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        self.recovery.close()
        self._requests.close()

    # ------------------------------------------------------------------ batches

    async def _dispatch_all(self) -> None:
        segment = self._segment
        metrics, self._metrics = self._metrics, {}
        since, self._metrics_since = self._metrics_since, {}
        for run_id, batch in metrics.items():
            first = since[run_id]
            await self._spawn(self._requests.send_metrics(run_id, batch, segment, first), first)
        meta, self._meta = self._meta, {}
        since, self._meta_since = self._meta_since, {}
        for run_id, events in meta.items():
            batches = pack_meta(run_id, events)
            folded = len(events) - sum(len(b) for b in batches)  # a tag set twice, say
            self._ledger.stored(folded, request=False)
            self._source.ack(segment, folded)
            first = since[run_id]
            for meta_batch in batches:
                send = self._lanes.send_meta(run_id, meta_batch.events(), segment, first)
                await self._spawn(send, first)

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
        self._in_flight[task] = since
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        error = None if task.cancelled() else task.exception()
        if not task.cancelled() and error is None:  # else its events are not settled
            self._in_flight.pop(task, None)
            self._report()
        if isinstance(error, GaveUp):  # sync's deadline: what is unsettled stays on disk
            self._failure = self._failure or error
        elif error is not None:  # a bug: say so, and keep the worker going
            logger.error("asynctrack send failed", exc_info=error)

    # ------------------------------------------------------------------ jobs and settling

    async def _run_job(self, job: Job, segment: int, since: int) -> None:
        try:
            if self._jobs is None:
                raise RuntimeError("no job context to run it in")
            await job.work(self._jobs)
        except GaveUp as exc:  # sync's deadline: the job stays on disk, for the next sync
            self._failure = self._failure or exc
        except Held as exc:  # credentials or a permission: the staged files stay
            self._requests.park(Parked(job.run_id, "job", [job], segment, since, exc.reason))
        except Exception as exc:  # reported at the next flush, named by the job's label
            self._source.note_done(job, segment, stored=False)
            reason = str(exc) or repr(exc)
            self._requests.refuse([Rejection(job.run_id, job.kind, job.label, reason)], segment)
        else:
            self._source.note_done(job, segment, stored=True)
            self._requests.completed(segment)

    def _report(self, upto: int | None = None, now: bool = False) -> None:
        """Tell the source how many chunks, from the first, are settled."""
        low = self._chunks if upto is None else upto
        for pending in (self._metrics_since, self._meta_since, self._in_flight):
            if pending:
                low = min(low, min(pending.values()))
        parked = self.kept.since()
        self._source.settled(low if parked is None else min(low, parked), now)
