"""One retry policy for everything asynctrack sends: batches and run ends from the live
worker, ``asynctrack sync``'s replay, and S3 uploads.

A call either succeeds, raises :class:`~asynctrack._engine.transport.Transient` (the
server is away, overloaded or slow: try again later), raises
:class:`~asynctrack._engine.transport.Held` (credentials or a permission refused: the
caller keeps what it sent, for later) or raises
:class:`~asynctrack._engine.transport.Refused` (the server said no: retrying cannot help).
Any other exception means the request could not even be built (a value that cannot be
encoded) or a bug: it is refused too, so one bad event never stops the worker or a sync.

Transient failures are retried after a delay that doubles from ``first`` up to
``maximum``, jittered by +-50% so that processes that lost the same server do not come
back in step; a server's ``Retry-After`` is a floor for that delay. ``patience`` bounds the
time spent without any answer (``sync --timeout``); the live worker has none: it waits
for the server as long as the process lives, and the exit deadline cuts it short.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from asynctrack._engine.transport import Held, Refused, Transient, short

T = TypeVar("T")


class GaveUp(Exception):
    """The server gave no answer for ``patience`` seconds; the last reason is the message."""


@dataclass(frozen=True)
class RetryPolicy:
    first: float = 0.25
    maximum: float = 8.0
    patience: float = math.inf

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay * random.uniform(0.5, 1.5)
            delay = min(delay * 2, self.maximum)

    async def attempt(
        self, call: Callable[[], Awaitable[T]], on_transient: Callable[[Transient], None]
    ) -> T | Refused | Held:
        """Await ``call()`` until it returns (its result), is refused or held (the answer)."""
        delays, deadline = self.delays(), time.monotonic() + self.patience
        while True:
            try:
                return await call()
            except Transient as exc:
                on_transient(exc)
                await asyncio.sleep(self._pause(exc, next(delays), deadline))
            except (Refused, Held) as exc:
                return exc
            except Exception as exc:
                return _not_sent(exc)

    def attempt_blocking(
        self, call: Callable[[], T], on_transient: Callable[[Transient], None]
    ) -> T | Refused | Held:
        """:meth:`attempt` for a blocking call, on the calling thread."""
        delays, deadline = self.delays(), time.monotonic() + self.patience
        while True:
            try:
                return call()
            except Transient as exc:
                on_transient(exc)
                time.sleep(self._pause(exc, next(delays), deadline))
            except (Refused, Held) as exc:
                return exc
            except Exception as exc:
                return _not_sent(exc)

    @staticmethod
    def _pause(exc: Transient, delay: float, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GaveUp(str(exc)) from None
        return min(max(delay, exc.retry_after or 0.0), remaining)


def _not_sent(exc: Exception) -> Refused:
    # Splittable: the request may fail because of one event in it, and halving finds it.
    return Refused(short(f"not sent: {type(exc).__name__}: {exc}"), splittable=True)
