"""Requests the server held back: refused for credentials or a permission.

Such a refusal (HTTP 401, 403, 407) is about who asks, not about the data, and the user
can fix it: a rotated password, an expired token, a permission granted later. So nothing
of it is final. The request is parked here, per run and in order, and its events stay
unsettled: the spool keeps them, a flush reports them as kept, and they are delivered by
the process once the server takes them again, or by ``asynctrack sync``.

A run with params, tags or its end parked has the later ones parked behind them without
being sent, so the last ``set_tag`` still wins and a run ends after its events. Metrics
carry their own step and timestamp: they go out as they come.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["metrics", "meta", "end", "job"]

#: Seconds before the first retry of a parked request, and the longest pause between two.
FIRST_RETRY, LONGEST_PAUSE = 2.0, 60.0


@dataclass(frozen=True)
class Parked:
    """One request the server held back, as it will be sent again."""

    run_id: str
    kind: Kind
    events: Sequence[Any]  # metric tuples, MetaEvents, one end MetaEvent, or one Job
    segment: int  # the spool segment its events are counted against
    since: int  # the first chunk it holds events of (for the source's settled count)
    reason: str  # the server's answer, e.g. "HTTP 401: You are not authenticated"


class Kept:
    """The parked requests of one dispatcher, and when to try them again."""

    def __init__(self, first: float = FIRST_RETRY, longest: float = LONGEST_PAUSE) -> None:
        self._first, self._longest = first, longest
        self._runs: dict[str, list[Parked]] = {}
        self.events = 0  # events parked now, across runs (read by other threads)
        self.by_run: dict[str, int] = {}  # run -> events parked now
        self.reason = ""  # the last answer that parked something
        self._pause = first

    def __bool__(self) -> bool:
        return bool(self._runs)

    def park(self, parked: Parked) -> None:
        self._runs.setdefault(parked.run_id, []).append(parked)
        count = len(parked.events)
        self.events += count
        self.by_run[parked.run_id] = self.by_run.get(parked.run_id, 0) + count
        self.reason = parked.reason

    def blocks(self, run_id: str) -> bool:
        """Whether ``run_id``'s next params, tags or end must wait behind parked ones."""
        return any(p.kind != "metrics" for p in self._runs.get(run_id, ()))

    def reason_of(self, run_id: str) -> str:
        parked = self._runs.get(run_id)
        return parked[-1].reason if parked else self.reason

    def since(self) -> int | None:
        """The first chunk any parked request holds events of (None: nothing parked; jobs
        are left out, as the dispatcher leaves them out of its count)."""
        firsts = [p.since for parked in self._runs.values() for p in parked if p.kind != "job"]
        return min(firsts) if firsts else None

    def take(self) -> dict[str, list[Parked]]:
        """Everything parked, per run in order, to send again; parked anew if held again."""
        runs, self._runs = self._runs, {}
        self.events = 0
        self.by_run = {}
        return runs

    def next_pause(self) -> float:
        """Seconds to wait before the next round; each round without success doubles it."""
        pause, self._pause = self._pause, min(self._pause * 2, self._longest)
        return pause * random.uniform(0.75, 1.25)

    def delivered(self) -> None:
        """A round got something through: the next pause is short again."""
        self._pause = self._first
