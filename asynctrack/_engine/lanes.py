"""Params, tags and a run's end: one lane per run, in logging order.

Metrics carry their own step and timestamp, so their requests may overlap; params and
tags do not (the last ``set_tag`` must win), so a run's meta requests go one at a time,
in order, and its end after them (the dispatcher sends an end once everything before it
is settled). A run with params, tags or its end held back (:mod:`.kept`) has the later
ones parked behind them, unsent.

Tags also have ghosts. A failed attempt of a tags request may still reach the server
after its retry, and after newer values of its tags: unanswered, dropped, or answered with
an error by a proxy the request went through. Its keys are remembered with the last value
this process stored; before the run ends (and at a flush) the run's tags are read back and
any the server holds with another value are set again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from asynctrack._engine.events import MetaEvent, now_ms
from asynctrack._engine.kept import Parked
from asynctrack._engine.requests import Requests
from asynctrack._engine.transport import Held, KeyValue
from asynctrack.errors import Rejection

logger = logging.getLogger("asynctrack")


class Lanes:
    def __init__(self, requests: Requests) -> None:
        self._requests = requests
        self._locks: dict[str, asyncio.Lock] = {}
        # run -> tag key -> the last value stored by this process (None: not stored yet),
        # for the keys of meta requests with a failed attempt that may still land
        self._ghosts: dict[str, dict[str, str | None]] = {}

    def lane(self, run_id: str) -> asyncio.Lock:
        """The run's lane: FIFO, so requests that wait for it go in logging order."""
        return self._locks.setdefault(run_id, asyncio.Lock())

    async def send_meta(
        self, run_id: str, events: Sequence[MetaEvent], segment: int, since: int
    ) -> None:
        async with self.lane(run_id):
            kept = self._requests.kept
            if kept.blocks(run_id):  # earlier params or tags wait: these go after them
                parked = Parked(run_id, "meta", events, segment, since, kept.reason_of(run_id))
                self._requests.park(parked)
            else:
                await self.send_meta_in_lane(run_id, events, segment, since)

    async def send_meta_in_lane(
        self, run_id: str, events: Sequence[MetaEvent], segment: int, since: int
    ) -> None:
        requests = self._requests
        params = [(e.key, e.value) for e in events if e.kind == "param"]
        tags = [(e.key, e.value) for e in events if e.kind == "tag"]
        transport = requests.transport
        call = requests.blocking(lambda: transport.log_batch(run_id, (), params, tags))
        refused = await requests.attempt(len(events), call, lambda: self._haunt(run_id, tags))
        if refused is None:
            requests.stored(len(events), segment)
            ghosts = self._ghosts.get(run_id)
            if ghosts:  # the normal path stops here: no run has ghosts
                ghosts.update((k, v) for k, v in tags if k in ghosts)
        elif isinstance(refused, Held):
            requests.park(Parked(run_id, "meta", events, segment, since, refused.reason))
        elif refused.splittable and len(events) > 1:
            half = len(events) // 2
            await self.send_meta_in_lane(run_id, events[:half], segment, since)
            await self.send_meta_in_lane(run_id, events[half:], segment, since)
        else:
            reason = refused.reason
            requests.refuse([Rejection(run_id, e.kind, e.key, reason) for e in events], segment)

    async def end_run(self, event: MetaEvent, segment: int, since: int) -> None:
        """The run's end, once everything before it is settled (the caller waits for that)."""
        requests, run_id, status = self._requests, event.run_id, event.value
        if run_id in requests.kept.by_run:  # a run ends after its events: they are held back
            reason = requests.kept.reason_of(run_id)
            requests.park(Parked(run_id, "end", [event], segment, since, reason))
            return
        if run_id in self._ghosts:
            await self.lay_ghosts(run_id)
            del self._ghosts[run_id]
        end_time = event.when or now_ms()
        transport = requests.transport
        call = requests.blocking(lambda: transport.end_run(run_id, status, end_time))
        refused = await requests.attempt(1, call)
        if isinstance(refused, Held):
            requests.park(Parked(run_id, "end", [event], segment, since, refused.reason))
            return
        self._locks.pop(run_id, None)
        if refused is None:
            requests.completed(segment)
        else:
            requests.refuse([Rejection(run_id, "run", "status", refused.reason)], segment)

    async def lay_all_ghosts(self) -> None:
        for run_id in list(self._ghosts):  # kept: a ghost may come later still
            await self.lay_ghosts(run_id)

    def _haunt(self, run_id: str, tags: Sequence[KeyValue]) -> None:
        """An attempt to store ``tags`` failed, so it may land yet, at any later time."""
        if tags:
            ghosts = self._ghosts.setdefault(run_id, {})
            for key, _ in tags:
                ghosts.setdefault(key, None)

    async def lay_ghosts(self, run_id: str) -> None:
        """Set again every ghosted tag the server holds with a value other than the last one
        this process stored (a late first attempt overwrote it)."""
        requests, ghosts = self._requests, self._ghosts[run_id]
        held: dict[str, str] = {}

        def read() -> None:
            held.update(requests.transport.run_tags(run_id))

        if await requests.attempt(0, requests.blocking(read)) is not None:
            return  # the run is gone, say: its end (or nothing) reports that
        stale = [(k, v) for k, v in ghosts.items() if v is not None and k in held and held[k] != v]
        if stale:
            logger.info(
                "asynctrack: %d tag(s) of run %s overwritten late; set again", len(stale), run_id
            )
            transport = requests.transport
            call = requests.blocking(lambda: transport.log_batch(run_id, (), (), stale))
            refused = await requests.attempt(0, call, lambda: self._haunt(run_id, stale))
            if refused is not None:
                logger.warning(
                    "asynctrack: run %s: stale tags not set again: %s", run_id, refused.reason
                )
