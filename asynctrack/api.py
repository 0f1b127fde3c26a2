"""Module-level delivery controls: ``flush``, ``aflush`` and ``stats``."""

from __future__ import annotations

import anyio.to_thread

from asynctrack._engine import flush_all
from asynctrack._engine import stats as _stats
from asynctrack._engine.stats import Stats

__all__ = ["aflush", "flush", "stats"]


def flush(timeout: float | None = None) -> None:
    """Return once everything logged so far (to every tracking server) is stored.

    ``timeout=None`` uses the configured ``flush_timeout``; pass ``math.inf`` to wait without
    a deadline. Raises :class:`~asynctrack.errors.FlushTimeoutError` at the deadline and
    :class:`~asynctrack.errors.DeliveryError` naming events the server refused.
    """
    flush_all(timeout)


async def aflush(timeout: float | None = None) -> None:
    """:func:`flush` without blocking the event loop."""
    await anyio.to_thread.run_sync(flush_all, timeout, abandon_on_cancel=True)


def stats() -> Stats:
    """Counters for this process: events queued, sent, retried, rejected, dropped, batches
    sent and requests in flight; artifact files and bytes queued, uploaded, retried, failed."""
    return _stats()
