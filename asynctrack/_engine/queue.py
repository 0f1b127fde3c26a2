"""The front door: the callers' queue, its capacity policy and flush barriers.

Callers append to a ``deque`` (thread-safe, about 40 ns) and return; they never signal the
worker, because waking another thread costs more than the call itself. The worker takes
what is queued a few times a second (:meth:`EventQueue.take`). Only a full queue or a
flush wakes it early.

A full queue (the server away and the spool's disk full, say) under the "block" policy
makes a caller wait up to ``flush_timeout`` once; then training goes on and what does not
fit is dropped, counted, until the worker makes room again. A long job is worth more than
its metrics. The "raise" policy raises instead, "drop" drops without waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from asynctrack._engine.events import Barrier, Event, Job
from asynctrack.config import EngineConfig
from asynctrack.errors import QueueFullError

_POLL = 0.05  # seconds between two looks at the room left, for a caller that waits

#: Why an event was dropped, as ``stats().dropped_reasons`` counts it.
DROP_POLICY = "queue full (full_policy 'drop')"
SHED = "queue full for flush_timeout (full_policy 'block'): dropped so training goes on"


class EventQueue:
    __slots__ = (
        "_barriers_put",
        "_barriers_taken",
        "_buf",
        "_capacity",
        "_full_message",
        "_limit",
        "_on_drop",
        "_policy",
        "_room",
        "_shedding",
        "_start",
        "_timeout",
        "_wake",
    )

    def __init__(
        self,
        config: EngineConfig,
        start: Callable[[], None],
        wake: Callable[[], None],
        on_drop: Callable[[str], None],
        full_message: Callable[[], str],
    ) -> None:
        self._buf: deque[Event] = deque()
        self._capacity = config.queue_capacity
        self._policy = config.full_policy
        self._timeout = config.flush_timeout
        self._start, self._wake, self._on_drop = start, wake, on_drop
        self._full_message = full_message
        self._room = threading.Condition(threading.Lock())
        # The hot path's one comparison: the capacity while the worker runs, else 0, so a
        # closed or not yet started queue always takes the slow path.
        self._limit = 0
        self._barriers_put = 0  # by callers, under the lock
        self._barriers_taken = 0  # by the worker
        self._shedding = False  # "block" waited once and found no room: drop until room

    def put(self, event: Event) -> None:
        """The hot path: queue one event and return."""
        if len(self._buf) < self._limit:
            self._buf.append(event)
            return
        self._put_slow(event)

    @property
    def open(self) -> bool:
        """Whether the worker takes events (set by the engine as it starts and stops)."""
        return self._limit > 0

    @open.setter
    def open(self, value: bool) -> None:
        self._limit = self._capacity if value else 0

    def barrier(self) -> Barrier:
        """Queue a flush barrier (it always gets in) and wake the worker for it."""
        barrier = Barrier()
        with self._room:
            self._barriers_put += 1
        self.put(barrier)
        self._wake()
        return barrier

    def _put_slow(self, event: Event) -> None:
        if not self.open:
            self._start()
        # Barriers and jobs (staged files on disk, already counted) always get in.
        if len(self._buf) < self._capacity or isinstance(event, (Barrier, Job)):
            self._buf.append(event)
            return
        if self._policy == "drop":
            self._on_drop(DROP_POLICY)
            return
        self._wake()
        if self._policy == "raise":
            raise QueueFullError(self._full_message())
        if self._shedding:
            self._on_drop(SHED)
            return
        deadline = time.monotonic() + self._timeout
        with self._room:
            while len(self._buf) >= self._capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._shedding = True
                    self._on_drop(SHED)
                    return
                self._room.wait(min(remaining, _POLL))
        self._buf.append(event)

    # ------------------------------------------------------------------ the worker's side

    def take(self, limit: int) -> list[Event]:
        """Up to ``limit`` events, oldest first (the worker's thread only)."""
        buf = self._buf
        taken = [buf.popleft() for _ in range(min(len(buf), limit))]
        self._barriers_taken += sum(1 for e in taken if type(e) is Barrier)
        return taken

    def give_back(self, events: list[Event]) -> None:
        """Put taken events back at the front (the spool failed and memory is full)."""
        self._barriers_taken -= sum(1 for e in events if type(e) is Barrier)
        self._buf.extendleft(reversed(events))

    def notify_room(self) -> None:
        with self._room:
            if len(self._buf) < self._capacity:
                self._shedding = False  # room again: "block" keeps events again
            self._room.notify_all()

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def capacity(self) -> int:
        return self._capacity

    def waiting(self) -> int:
        """Events queued, barriers not counted."""
        return len(self._buf) - (self._barriers_put - self._barriers_taken)

    def clear(self) -> None:
        """In a forked child: the parent's events stay the parent's."""
        self._buf.clear()
        self._barriers_put = self._barriers_taken = 0
        self._room = threading.Condition(threading.Lock())
        self.open = False
