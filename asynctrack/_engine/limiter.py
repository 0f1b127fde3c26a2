"""How many requests one tracking server gets from this process at once, adapted to it.

A fixed number in flight is either too polite for one process alone (the server stores
about twice as much with 4 calls in flight as with 1) or too much for 16 processes at once
(64 requests against a server with 4 workers wait for database connections, time out, and
are sent again). So the number adapts, AIMD as in TCP and Netflix's concurrency-limits:

- it starts at ``initial`` (2) and, while the server answers about as fast as usual and
  the slots are in use, grows by one per answer until the server first pushes back (slow
  start, doubling per round), then by one per full window of answers (``1/limit`` each);
- it shrinks to ``0.9x`` when answers get slower (the recent average beyond ``tolerance`` x
  the usual, so a server queueing requests is noticed before it times out), and halves on a
  timeout or an overload answer (429, 5xx, MLflow's "QueuePool limit" 400);
- it shrinks at most once per round of requests: answers to requests sent before the last
  decrease tell of the same congestion and would otherwise take it straight to 1;
- it stays within ``[1, max_in_flight]``.

A ``Retry-After`` is one backoff for the whole server: every sender of the process waits.

The request timeout follows the server too (``request_timeout(base)``): a request the server
is still working on is not cut off and sent again, which only adds to its queue. Each
timeout doubles it (up to ``MAX_TIMEOUT_SCALE`` x the configured one); answers bring it back
down by 5% each; it never falls below 4x the recent latency.

One limiter per server (scheme, host, port) per process, shared by every engine talking to
it (``limiter_for``). Engines run their own event loops on their own threads, so the state
sits behind a ``threading.Lock`` and a freed slot is handed to a waiter of any loop with
``call_soon_threadsafe``. A forked child starts afresh: the parent's requests are not its.

A sender holds a slot for one attempt only, so a request waiting to be retried does not
keep others out::

    token = await limiter_for(tracking_uri, config.max_in_flight).acquire()
    try:
        status, text, retry_after = await pool.run(lambda: wire.post_full(endpoint, body))
    except TimeoutError:
        token.done(Outcome.TIMEOUT)
        raise
    except OSError:
        token.done(Outcome.ERROR)
        raise
    token.done(outcome_of(status, text), retry_after=retry_after)  # transport.outcome_of

The limiter knows outcomes, not HTTP: the transport says what an answer means for load.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["Limiter", "Outcome", "Token", "limiter_for"]


class Outcome(enum.Enum):
    """What an answer (or its absence) says about the server's load, for the limiter."""

    OK = "ok"  # stored or refused on its merits: the server is answering normally
    OVERLOAD = "overload"  # 408, 425, 429, 5xx, an exhausted database pool
    TIMEOUT = "timeout"  # no answer in time: the server may still be working on it
    ERROR = "error"  # refused connection and the like: says nothing about load


INITIAL_LIMIT = 2
TOLERANCE = 2.0  # answers this much slower than usual count as a server queueing requests
SLOWER, OVERLOAD = 0.9, 0.5  # how much the limit keeps on each kind of bad news
# Moving averages of latency, over about 20 answers (100 while slow) and 3 answers.
_USUAL_WEIGHT, _SLOW_WEIGHT, _RECENT_WEIGHT = 0.05, 0.01, 0.3
MAX_TIMEOUT_SCALE = 8.0  # 30 s configured: at most 4 minutes for one request
_TIMEOUT_DECAY = 0.95
_TIMEOUT_LATENCIES = 4.0  # a request gets at least this many times the recent latency

# A proxy or a server that asks for hours would stall every sender: bounded, the retry
# policy's own deadlines still apply.
MAX_BACKOFF = 120.0


@dataclass(eq=False)
class Token:
    """One request's slot; ``done()`` gives it back with what the answer says about load."""

    limiter: Limiter
    generation: int  # a token from before a fork means nothing to the child's limiter
    busy: bool  # half the slots were in use when this one was taken: growth is earned
    started: float = 0.0
    finished: bool = field(default=False, repr=False)

    def done(
        self, outcome: Outcome, latency: float | None = None, retry_after: float | None = None
    ) -> None:
        """Release the slot (once; later calls do nothing). ``latency`` defaults to the
        time since the request started; ``retry_after`` (seconds) backs off the server."""
        self.limiter._done(self, outcome, latency, retry_after)


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    granted: bool = False


class Limiter:
    def __init__(
        self,
        max_limit: int,
        *,
        initial: int = INITIAL_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if max_limit < 1:
            raise ValueError(f"max_limit must be at least 1, got {max_limit}")
        self.max_limit = max_limit
        self._initial = initial
        self._clock = clock
        self._sleep = sleep
        self._reset()
        _all_limiters.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # a new one after fork: a parent thread may have held it
        self._generation = getattr(self, "_generation", 0) + 1
        self._limit = float(min(self._initial, self.max_limit))
        self._in_flight = 0
        self._waiters: deque[_Waiter] = deque()
        self._usual = self._recent = 0.0  # moving averages of latency; 0 until a first answer
        self._last_decrease = -float("inf")
        self._until = -float("inf")
        self._timeout_scale = 1.0
        self._timeout_raised = -float("inf")

    @property
    def limit(self) -> int:
        return max(1, int(self._limit + 1e-9))  # 3 + 1/3 + 1/3 + 1/3 is 4, not 3.999...

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def delay(self) -> float:
        """Seconds every sender must still wait because of a ``Retry-After``."""
        return max(0.0, self._until - self._clock())

    def request_timeout(self, base: float) -> float:
        """Seconds the next request may take: ``base`` as configured, more while the
        server is slow (see the module's docstring)."""
        return max(base * self._timeout_scale, _TIMEOUT_LATENCIES * self._recent)

    def backoff_until(self, when: float) -> None:
        """No request to this server before ``when`` (on the limiter's clock)."""
        with self._lock:
            self._until = max(self._until, min(when, self._clock() + MAX_BACKOFF))

    async def acquire(self) -> Token:
        """Wait for a slot, then for any backoff; FIFO across every engine of the process."""
        token = await self._take_slot()
        try:
            while (wait := self.delay()) > 0:
                await self._sleep(wait)
        except BaseException:  # cancelled while backing off: the slot goes to the next one
            with self._lock:
                if token.generation == self._generation:
                    self._release(token)
            raise
        token.started = self._clock()
        return token

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Token]:
        """``async with limiter.slot() as token:``; left without ``token.done()``, the slot
        counts as answered (ok), or as a plain error when the block raised."""
        token = await self.acquire()
        try:
            yield token
        except BaseException:
            token.done(Outcome.ERROR)
            raise
        token.done(Outcome.OK)

    async def _take_slot(self) -> Token:
        with self._lock:
            if not self._waiters and self._in_flight < self.limit:
                self._in_flight += 1
                return Token(self, self._generation, busy=self._in_flight * 2 >= self.limit)
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                if waiter.granted:  # granted as it was cancelled: pass the slot on
                    self._release(Token(self, self._generation, busy=False))
                else:
                    self._waiters.remove(waiter)
            raise
        return Token(self, self._generation, busy=True)  # it had to wait: slots all in use

    def _done(
        self, token: Token, outcome: Outcome, latency: float | None, retry_after: float | None
    ) -> None:
        now = self._clock()
        if retry_after is not None:
            self.backoff_until(now + retry_after)
        with self._lock:
            if token.finished or token.generation != self._generation:
                return
            self._adapt(token, outcome, now - token.started if latency is None else latency, now)
            self._release(token)

    def _adapt(self, token: Token, outcome: Outcome, latency: float, now: float) -> None:
        fresh = token.started >= self._last_decrease  # sent after the last decrease
        if outcome is Outcome.TIMEOUT:
            if token.started >= self._timeout_raised:  # once per round, as for the limit
                self._timeout_scale = min(MAX_TIMEOUT_SCALE, self._timeout_scale * 2)
                self._timeout_raised = now
        elif outcome is not Outcome.ERROR:  # the server answered
            self._timeout_scale = max(1.0, self._timeout_scale * _TIMEOUT_DECAY)
        if outcome is Outcome.OK:
            if not self._usual:
                self._usual = self._recent = latency
            self._recent += (latency - self._recent) * _RECENT_WEIGHT
            slow = self._recent > TOLERANCE * self._usual
            # While slow, the usual latency follows only slowly: a server queueing requests
            # must not become the norm in a round, yet a lasting change is accepted.
            self._usual += (latency - self._usual) * (_SLOW_WEIGHT if slow else _USUAL_WEIGHT)
            if slow:
                if fresh:
                    self._decrease(SLOWER, now)
            elif token.busy or self._in_flight * 2 >= self.limit:
                # Slow start, as TCP's: until the server first pushes back, one more slot
                # per answer (doubling per round), so a short job gets going at once.
                step = 1.0 if self._last_decrease == -float("inf") else 1 / self.limit
                self._limit = min(self.max_limit, self._limit + step)
        elif outcome in (Outcome.OVERLOAD, Outcome.TIMEOUT) and fresh:
            self._decrease(OVERLOAD, now)

    def _decrease(self, factor: float, now: float) -> None:
        self._limit = max(1.0, self._limit * factor)
        self._last_decrease = now

    def _release(self, token: Token) -> None:  # under the lock
        token.finished = True
        self._in_flight -= 1
        # Hand freed slots straight to waiters, so a newcomer cannot overtake them.
        while self._waiters and self._in_flight < self.limit:
            waiter = self._waiters.popleft()
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its loop is closed: that engine is gone
                continue
            waiter.granted = True
            self._in_flight += 1


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_all_limiters: weakref.WeakSet[Limiter] = weakref.WeakSet()
_registry: dict[tuple[str, str, int], Limiter] = {}
_registry_lock = threading.Lock()


def server_key(url: str) -> tuple[str, str, int]:
    """What makes two tracking URIs one server: scheme, host and port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "localhost").lower(), port


def limiter_for(url: str, max_in_flight: int) -> Limiter:
    """The process's limiter for the server of ``url``. Engines configured with different
    ``max_in_flight`` for one server share the largest bound."""
    key = server_key(url)
    with _registry_lock:
        limiter = _registry.get(key)
        if limiter is None:
            limiter = _registry[key] = Limiter(max_in_flight)
        elif max_in_flight > limiter.max_limit:
            limiter.max_limit = max_in_flight
        return limiter


def after_fork_in_child() -> None:
    """Called by the process's one fork hook (``runtime``): the parent's requests are not
    the child's."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _registry.clear()
    for limiter in list(_all_limiters):  # ones an engine still holds start afresh too
        limiter._reset()
