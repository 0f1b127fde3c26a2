"""Counters the worker keeps, and the snapshot users read with ``asynctrack.stats()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Stats:
    """What happened to the events handed to asynctrack so far, in this process.

    ``queued`` events are accepted but not yet stored; ``sent`` were stored by the server;
    ``retried`` counts events re-sent after a transient failure (once per retry);
    ``rejected`` were refused by the server and reported by ``flush()``; ``dropped`` were
    turned away by a full queue under the "drop" policy; ``batches_sent`` counts successful
    ``log_batch`` calls; ``in_flight`` is the number of requests under way right now.
    """

    queued: int = 0
    sent: int = 0
    retried: int = 0
    rejected: int = 0
    dropped: int = 0
    batches_sent: int = 0
    in_flight: int = 0

    def __add__(self, other: Stats) -> Stats:
        mine, theirs = asdict(self), asdict(other)
        return Stats(**{k: mine[k] + theirs[k] for k in mine})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
