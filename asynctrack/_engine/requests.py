"""One request to the tracking store, and what its answer does to the events in it.

Every request goes out on a sender thread (the transport blocks), within the server's
:class:`~asynctrack._engine.limiter.Limiter` for each attempt, retried by the
:class:`~asynctrack._engine.retry.RetryPolicy` while the answer is transient. Then its
events are settled: stored, or refused (a request of metrics is split in half until the
events at fault are alone), or parked when the server held them back for credentials or
a permission (:mod:`.kept`). Each settled event is counted in the :class:`Ledger` and
acknowledged to its source once, so a spool segment is forgotten only when all of its
events are answered for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from asynctrack._engine.events import Job, Metric
from asynctrack._engine.kept import Kept, Parked
from asynctrack._engine.ledger import Ledger
from asynctrack._engine.limiter import Limiter, Outcome
from asynctrack._engine.retry import RetryPolicy
from asynctrack._engine.threads import DaemonPool
from asynctrack._engine.transport import Held, Refused, Transient, Transport
from asynctrack.errors import Rejection


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


class Requests:
    """Sends requests for one dispatcher and settles their events."""

    def __init__(
        self,
        source: Source,
        transport: Transport,
        ledger: Ledger,
        policy: RetryPolicy,
        limiter: Limiter | None,
        kept: Kept,
        senders: int,
    ) -> None:
        self.source, self.transport, self.ledger = source, transport, ledger
        self._policy, self._limiter = policy, limiter
        self.kept = kept
        self._senders = DaemonPool(senders, "asynctrack-send")
        #: Called after a request is parked (the dispatcher starts its recovery then).
        self.on_park: Callable[[], None] = lambda: None

    def close(self) -> None:
        self._senders.close()

    def blocking(self, fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
        """``fn`` as an awaitable call on a sender thread."""
        return lambda: self._senders.run(fn)

    async def attempt(
        self,
        count: int,
        call: Callable[[], Awaitable[object]],
        on_transient: Callable[[], None] | None = None,
    ) -> Refused | Held | None:
        """``call()`` until it is answered; None when it succeeded, else the refusal."""

        async def counted() -> None:
            token = None if self._limiter is None else await self._limiter.acquire()
            outcome, retry_after = Outcome.OK, None  # a refusal is an answer like any other
            self.ledger.in_flight += 1
            try:
                await call()
            except Transient as exc:
                outcome, retry_after = exc.outcome, exc.retry_after
                raise
            finally:
                self.ledger.in_flight -= 1
                if token is not None:
                    token.done(outcome, retry_after=retry_after)

        def retrying(exc: Transient) -> None:
            self.ledger.retrying(count, str(exc))
            if on_transient is not None:
                on_transient()

        result = await self._policy.attempt(counted, retrying)
        return result if isinstance(result, (Refused, Held)) else None

    async def send_metrics(
        self, run_id: str, batch: Sequence[Metric], segment: int, since: int
    ) -> None:
        transport = self.transport
        call = self.blocking(lambda: transport.log_batch(run_id, batch, (), ()))
        refused = await self.attempt(len(batch), call)
        if refused is None:
            self.stored(len(batch), segment)
        elif isinstance(refused, Held):
            self.park(Parked(run_id, "metrics", batch, segment, since, refused.reason))
        elif refused.splittable and len(batch) > 1:
            half = len(batch) // 2
            await self.send_metrics(run_id, batch[:half], segment, since)
            await self.send_metrics(run_id, batch[half:], segment, since)
        else:
            reason = refused.reason
            self.refuse([Rejection(run_id, "metric", m[1], reason) for m in batch], segment)

    async def refresh(self) -> None:
        """Resolve the transport's credentials again (before parked requests go again)."""
        await self._senders.run(self.transport.refresh)

    def stored(self, count: int, segment: int) -> None:
        self.ledger.stored(count)
        self.source.ack(segment, count)

    def completed(self, segment: int) -> None:
        """A run's end or a job done: settled, though no event was "sent"."""
        self.ledger.completed(1)
        self.source.ack(segment, 1)

    def refuse(self, rejections: list[Rejection], segment: int) -> None:
        self.ledger.refused(rejections)
        self.source.ack(segment, len(rejections))

    def park(self, parked: Parked) -> None:
        """Held back: the events stay unsettled (the spool keeps them), to go again."""
        self.kept.park(parked)
        self.on_park()
