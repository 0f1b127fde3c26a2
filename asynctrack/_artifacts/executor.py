"""A default executor for the worker's event loop that keeps working while Python exits.

aiohttp and aiobotocore hand some blocking steps to the loop's default executor: host name
lookups (``loop.getaddrinfo``) and building the TLS context of a new connection pool
(``asyncio.to_thread``). The standard ``ThreadPoolExecutor`` refuses new work once the
interpreter starts exiting, which is exactly when the final flush sends the last uploads,
so an endpoint such as ``minio:9000`` would never be reached then. This executor runs
such calls on a few daemon threads of its own and never refuses them; like the engine's
other threads, they cannot hold up the process's exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

_THREADS = 2  # lookups and TLS setups are rare and short

_Work = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """Only ``submit`` and ``shutdown`` are used by asyncio; the base class is what
    ``loop.set_default_executor`` insists on, its own threads are never started."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self._calls: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._daemons: list[threading.Thread] = []
        self._daemons_lock = threading.Lock()

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, fn, args, kwargs))
        with self._daemons_lock:
            if len(self._daemons) < _THREADS:
                thread = threading.Thread(
                    target=self._serve, name="asynctrack-default-executor", daemon=True
                )
                self._daemons.append(thread)
                thread.start()
        return future

    def _serve(self) -> None:
        while True:
            future, fn, args, kwargs = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to whoever awaits the future
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None  # daemon threads: nothing to join


def install(engine: Any) -> None:
    """Make a :class:`DaemonExecutor` the default executor of ``engine``'s loop (once)."""
    if "default_executor" not in engine.resources:
        executor = DaemonExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        engine.resources["default_executor"] = executor
