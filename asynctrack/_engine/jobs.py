"""What a job (an artifact upload, a model's flow) may use of the engine that runs it.

Jobs run on the worker's event loop; this is their whole contract with it, so they never
reach into the engine itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from asynctrack._engine.retry import RetryPolicy
from asynctrack._engine.stats import FileCounters
from asynctrack.config import EngineConfig

T = TypeVar("T")


@dataclass
class Resources:
    """Per-worker state jobs share, closed when the worker stops."""

    #: Long-lived async clients enter it; the worker closes it as it stops.
    exit_stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    #: One aiobotocore client per S3 settings (endpoint, credentials), made once.
    s3_clients: dict[Any, Any] = field(default_factory=dict)
    s3_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Files (or parts) uploaded at once, across every job of this worker.
    upload_slots: asyncio.Semaphore | None = None
    #: Whether staging areas are removed when the worker stops (once registered).
    staging_cleanup: bool = False
    #: Where this engine's calls stage their files, once the first call chose it.
    staging: Path | None = None


class JobContext(Protocol):
    config: EngineConfig
    resources: Resources
    tracking_uri: str
    #: How a job retries what its server answered as transient: as long as the process
    #: lives (the exit deadline cuts it short), or, in ``asynctrack sync``, its --timeout.
    retry: RetryPolicy

    @property
    def files(self) -> FileCounters:
        """Artifact counters: files and bytes queued, uploaded, retried, failed."""
        ...

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run a blocking call on a daemon thread (never the senders')."""
        ...

    def note_transient(self, reason: str) -> None:
        """Remember why a retry happened, for timeout and exit messages."""
        ...

    def spooled(self) -> int:
        """Events in the spool not yet stored."""
        ...
