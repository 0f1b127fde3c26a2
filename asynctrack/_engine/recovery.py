"""Sending again what the server held back, once the credentials or permissions are fixed.

While something is parked (:mod:`.kept`), the live worker makes a round every so often
(2 s, doubling to a minute while nothing gets through, short again once something does)
and at each flush: it resolves the credentials again from MLflow's sources (a rotated
token or password file is picked up without a restart), then sends every parked request
again, each run's in order. ``asynctrack sync`` makes no rounds: what it cannot deliver
stays on disk for the next sync.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from asynctrack._engine.events import Job
from asynctrack._engine.kept import Parked
from asynctrack._engine.lanes import Lanes
from asynctrack._engine.requests import Requests

logger = logging.getLogger("asynctrack")

RunJob = Callable[[Job, int, int], Awaitable[None]]


class Recovery:
    def __init__(
        self, requests: Requests, lanes: Lanes, run_job: RunJob, report: Callable[[], None]
    ) -> None:
        self._requests, self._lanes, self._run_job, self._report = requests, lanes, run_job, report
        self._loop_task: asyncio.Task[None] | None = None
        #: Runs being sent again now: a flush (or a run's end) waits for them.
        self.resends: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Something was parked: make rounds until nothing is (one loop at a time)."""
        if self._loop_task is None or self._loop_task.done():
            kept = self._requests.kept
            logger.warning(
                "asynctrack: the server refused the credentials or a permission (%s); what "
                "it refused is kept and sent again while this process runs",
                kept.reason,
            )
            self._loop_task = asyncio.get_running_loop().create_task(self._rounds())

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The loop of rounds while one runs (it ends once nothing is parked)."""
        return self._loop_task

    async def _rounds(self) -> None:
        kept = self._requests.kept
        while kept:
            await asyncio.sleep(kept.next_pause())
            await self.round()

    async def round(self) -> None:
        """Resolve the credentials again, then send every parked request again."""
        requests = self._requests
        await requests.refresh()
        ledger = requests.ledger
        before = ledger.sent + ledger.done + ledger.rejected
        loop = asyncio.get_running_loop()
        for parked in requests.kept.take().values():
            task = loop.create_task(self._resend(parked))
            self.resends.add(task)
            task.add_done_callback(self.resends.discard)
        await asyncio.gather(*self.resends, return_exceptions=True)
        if ledger.sent + ledger.done + ledger.rejected != before:
            requests.kept.delivered()
        self._report()

    async def _resend(self, requests: list[Parked]) -> None:
        """One run's parked requests, in order; once one is held back again, the rest are
        parked again as they are. The run's lane is held throughout, so its new params and
        tags wait behind these (and a flush or the run's end waits for the round)."""
        run_id, kept, lanes = requests[0].run_id, self._requests.kept, self._lanes
        async with lanes.lane(run_id):
            for i, p in enumerate(requests):
                if run_id in kept.by_run:  # held back again
                    for rest in requests[i:]:
                        kept.park(rest)
                    return
                if p.kind == "metrics":
                    await self._requests.send_metrics(run_id, p.events, p.segment, p.since)
                elif p.kind == "meta":
                    await lanes.send_meta_in_lane(run_id, p.events, p.segment, p.since)
                elif p.kind == "end":
                    await lanes.end_run(p.events[0], p.segment, p.since)
                else:
                    await self._run_job(p.events[0], p.segment, p.since)
