"""The worker: one named daemon thread running one asyncio loop, and nothing about events.

The engine hands it a coroutine to run (its intake and pump) and asks it to wake up,
to run a coroutine and wait for it, or to stop. A daemon thread, so a server that never
answers cannot hold up the interpreter's exit; the exit deadline bounds every wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from asynctrack._engine.threads import DaemonExecutor

T = TypeVar("T")


class Worker:
    def __init__(self, name: str = "asynctrack-worker") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None

    def start(self, main: Callable[[threading.Event], Coroutine[Any, Any, None]]) -> None:
        """Run ``main(started)`` on a new thread; return once it has set ``started``, or
        raise what ``main`` raised before that (a caller must never wait forever)."""
        started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(main, started), name=self._name, daemon=True
        )
        self._thread.start()
        started.wait()
        if self._failure is not None:
            raise self._failure

    def _run(
        self, main: Callable[[threading.Event], Coroutine[Any, Any, None]], started: threading.Event
    ) -> None:
        loop = asyncio.new_event_loop()
        # aiohttp and aiobotocore hand host lookups and TLS set-up to the default executor,
        # which must keep working while Python exits (see threads.DaemonExecutor).
        loop.set_default_executor(DaemonExecutor())
        self._loop = loop
        try:
            self._main = loop.create_task(main(started))
            try:
                loop.run_until_complete(self._main)
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                if started.is_set():
                    raise
                self._failure = exc  # start() raises it in the caller's thread
            finally:
                started.set()
            # As asyncio.run does: cancel what is left (sends retrying against a dead
            # server at exit) and let it unwind, so no "Task was destroyed" warnings.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:  # gather() of nothing looks for the thread's loop, and there is none
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        finally:
            loop.close()

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop soon, from any thread (nothing once the loop is gone)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(fn)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait up to ``timeout`` seconds for its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("the worker is not running")
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:  # the built-in TimeoutError from 3.11 on
            raise TimeoutError(f"no result within {timeout} s") from None

    def stop(self, join: float) -> None:
        """Cancel the main task and wait up to ``join`` seconds for the thread to end."""
        task = self._main
        if task is not None:
            self.call_soon(task.cancel)
        if self._thread is not None:
            self._thread.join(join)

    def forget(self) -> None:
        """In a forked child: the parent's thread and loop do not exist here."""
        self._thread = self._loop = self._main = None
