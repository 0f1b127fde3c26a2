"""Daemon threads that run blocking calls for the worker's event loop: the pools of
senders and of jobs' blocking work (:class:`DaemonPool`) and the loop's default executor
(:class:`DaemonExecutor`). Every thread asynctrack starts, but the worker's own, is here.

Not ``loop.run_in_executor``: ``concurrent.futures`` refuses new work once the interpreter
starts shutting down (its exit hook runs before ``atexit``), which is exactly when the final
flush needs it, and it joins its threads at exit, so a request hung on a dead server would
hang the process too. Daemon threads avoid both; the exit deadline bounds the wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class DaemonPool:
    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                self._idle += 1
                thread.start()
            self._idle -= 1
        self._jobs.put((fn, loop, future))
        return await future

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, loop, future = job
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting coroutine, not swallowed
                _resolve(loop, future, None, exc)
            else:
                _resolve(loop, future, result, None)
            with self._lock:
                self._idle += 1


def _resolve(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    def settle() -> None:
        if future.done():  # the awaiting task was cancelled (exit deadline)
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)

    with contextlib.suppress(RuntimeError):  # the loop closed while the call ran
        loop.call_soon_threadsafe(settle)


# ---------------------------------------------------------------------- default executor

# aiohttp and aiobotocore hand some blocking steps to the loop's default executor: host name
# lookups (``loop.getaddrinfo``) and building the TLS context of a new connection pool
# (``asyncio.to_thread``). The standard ``ThreadPoolExecutor`` refuses new work once the
# interpreter starts exiting, which is exactly when the final flush sends the last uploads,
# so an endpoint such as ``minio:9000`` would never be reached then.

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


def run_each(calls: Sequence[Callable[[], None]], at_once: int, name: str) -> None:
    """Run ``calls`` on up to ``at_once`` daemon threads and return once all have returned;
    raise the first exception one raised. For ``asynctrack sync``: one dead process's
    directory a call. Daemon threads, so Ctrl-C in the caller's thread (a join is
    interrupted by it) is not held up by a directory whose server does not answer."""
    pending: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
    for call in calls:
        pending.put(call)
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            try:
                call = pending.get_nowait()
            except queue.Empty:
                return
            try:
                call()
            except BaseException as exc:  # raised in the caller's thread below
                errors.append(exc)

    threads = [
        threading.Thread(target=work, name=f"{name}-{i}", daemon=True)
        for i in range(min(at_once, len(calls)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
