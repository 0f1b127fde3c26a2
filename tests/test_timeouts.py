"""Timeouts caught on every Python the package supports (``requires-python >= 3.10``).

Until 3.11, ``asyncio.wait_for`` raises ``asyncio.TimeoutError`` and
``concurrent.futures.Future.result`` raises ``concurrent.futures.TimeoutError``; neither is
the built-in ``TimeoutError`` that ``except TimeoutError`` catches.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from asynctrack._engine.engine import Engine
from asynctrack.config import EngineConfig

WAIT = 10.0  # seconds: a bound for a busy machine, never reached when things work


class Recorder:
    """A transport that stores every metric it is sent."""

    def __init__(self) -> None:
        self.metrics: list[Any] = []

    def log_batch(
        self, run_id: str, metrics: Sequence[Any], params: Sequence[Any], tags: Sequence[Any]
    ) -> None:
        self.metrics.extend(metrics)

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        pass

    def run_status(self, run_id: str) -> str:
        return "RUNNING"

    def run_tags(self, run_id: str) -> dict[str, str]:
        return {}

    def refresh(self) -> None:
        pass


def test_the_worker_lives_through_quiet_polls() -> None:
    transport = Recorder()
    config = EngineConfig(flush_interval=1000.0, spool=False)  # only flush() sends
    engine = Engine("fake://", config, lambda uri, timeout: transport)
    try:
        engine.put(("r", "loss", 1.0, 1.5, 0))
        engine.flush(WAIT)

        async def where() -> threading.Thread:
            return threading.current_thread()

        worker_thread = engine.worker.run(where(), WAIT)
        worker_thread.join(0.3)  # several polls (50 ms each) with nothing to do
        assert worker_thread.is_alive()
        engine.put(("r", "loss", 2.0, 1.5, 1))
        engine.flush(WAIT)
        assert [m[4] for m in transport.metrics] == [0, 1]
    finally:
        # on 3.10 with the worker dead, close() raises concurrent.futures.TimeoutError too
        with contextlib.suppress(Exception):
            engine.close(0.5)
