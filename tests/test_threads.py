"""DaemonPool and DaemonExecutor: the daemon threads that run the worker loop's blocking calls.

Calls that must overlap block on a :class:`Gate` the test opens, so concurrency is
observed, not hoped for; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable

import pytest

from asynctrack._engine.threads import DaemonExecutor, DaemonPool

WAIT = 10.0  # seconds: a bound for a busy machine, never reached when things work


class Gate:
    """Blocking calls that wait until the test opens the gate, counting who is inside."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._changed = threading.Condition()
        self.inside = 0
        self.most_inside = 0
        self.threads: set[threading.Thread] = set()

    def call(self, result: int) -> Callable[[], int]:
        def blocking() -> int:
            with self._changed:
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
                self.threads.add(threading.current_thread())
                self._changed.notify_all()
            assert self._open.wait(WAIT)
            with self._changed:
                self.inside -= 1
            return result

        return blocking

    def wait_inside(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.inside >= count, WAIT)

    async def until_inside(self, count: int) -> None:
        await asyncio.to_thread(self.wait_inside, count)

    def open(self) -> None:
        self._open.set()


def unique_name() -> str:
    return f"test-pool-{uuid.uuid4().hex[:8]}"


def threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def boom() -> int:
    raise ValueError("the server is a teapot")


# ---------------------------------------------------------------------------- DaemonPool


async def test_pool_returns_the_result_of_the_call() -> None:
    pool = DaemonPool(2, unique_name())
    try:
        assert await pool.run(lambda: 6 * 7) == 42
    finally:
        pool.close()


async def test_pool_raises_the_calls_exception_in_the_awaiting_coroutine() -> None:
    pool = DaemonPool(2, unique_name())
    try:
        with pytest.raises(ValueError, match="teapot"):
            await pool.run(boom)
        assert await pool.run(lambda: 1) == 1  # the thread survived it
    finally:
        pool.close()


async def test_pool_threads_are_named_daemons_off_the_loops_thread() -> None:
    name = unique_name()
    pool = DaemonPool(2, name)
    try:
        thread = await pool.run(threading.current_thread)
    finally:
        pool.close()
    assert thread is not threading.current_thread()
    assert thread.daemon
    assert thread.name == f"{name}-0"


async def test_pool_starts_at_most_size_threads() -> None:
    name, gate = unique_name(), Gate()
    pool = DaemonPool(2, name)
    try:
        calls = [asyncio.ensure_future(pool.run(gate.call(i))) for i in range(6)]
        await gate.until_inside(2)  # every run() has started meanwhile
        assert len(threads_named(name)) == 2
        gate.open()
        assert await asyncio.gather(*calls) == list(range(6))
    finally:
        pool.close()
    assert gate.most_inside == 2
    assert {t.name for t in gate.threads} <= {f"{name}-0", f"{name}-1"}


async def test_pool_runs_calls_at_once_up_to_size() -> None:
    gate = Gate()
    pool = DaemonPool(3, unique_name())
    try:
        calls = [asyncio.ensure_future(pool.run(gate.call(i))) for i in range(3)]
        await gate.until_inside(3)  # all three at once: none waits for another
        gate.open()
        assert await asyncio.gather(*calls) == [0, 1, 2]
    finally:
        pool.close()


async def test_pool_close_ends_its_threads() -> None:
    name = unique_name()
    pool = DaemonPool(2, name)
    thread = await pool.run(threading.current_thread)
    pool.close()
    await asyncio.to_thread(thread.join, WAIT)
    assert not thread.is_alive()
    assert threads_named(name) == []


def test_pool_survives_a_loop_that_closed_while_a_call_ran() -> None:
    """At exit the loop may close under a running call: its answer is dropped, quietly."""
    gate, pool = Gate(), DaemonPool(1, unique_name())

    async def abandon() -> None:
        call = asyncio.ensure_future(pool.run(gate.call(1)))
        await asyncio.to_thread(gate.wait_inside, 1)
        call.cancel()  # the exit deadline

    try:
        asyncio.run(abandon())
        gate.open()  # the call returns into a closed loop
        # the thread lived on to serve the next call
        assert asyncio.run(asyncio.wait_for(pool.run(lambda: 2), WAIT)) == 2
    finally:
        pool.close()


async def test_pool_drops_the_answer_of_a_cancelled_call() -> None:
    gate, pool = Gate(), DaemonPool(1, unique_name())
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    try:
        call = asyncio.ensure_future(pool.run(gate.call(1)))
        await gate.until_inside(1)
        call.cancel()
        gate.open()
        assert await pool.run(lambda: 2) == 2  # queued behind the cancelled one
        assert call.cancelled()
    finally:
        pool.close()
        asyncio.get_running_loop().set_exception_handler(None)
    assert errors == []


# ---------------------------------------------------------------------------- DaemonExecutor


def run_with_default_executor(main: Callable[[], Awaitable[object]]) -> object:
    async def with_executor() -> object:
        asyncio.get_running_loop().set_default_executor(DaemonExecutor())
        return await main()

    return asyncio.run(with_executor())


def test_executor_is_accepted_as_a_loops_default_executor() -> None:
    async def main() -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, pow, 2, 10)

    assert run_with_default_executor(main) == 1024


def test_executor_runs_calls_on_named_daemon_threads() -> None:
    async def main() -> object:
        return await asyncio.get_running_loop().run_in_executor(None, threading.current_thread)

    thread = run_with_default_executor(main)
    assert isinstance(thread, threading.Thread)
    assert thread.daemon and thread.name == "asynctrack-default-executor"


def test_executor_serves_to_thread_and_raises_the_calls_exception() -> None:
    async def main() -> object:
        assert await asyncio.to_thread(str.upper, "ok") == "OK"
        with pytest.raises(ValueError, match="teapot"):
            await asyncio.get_running_loop().run_in_executor(None, boom)
        return "done"

    assert run_with_default_executor(main) == "done"


def test_executor_uses_at_most_two_threads() -> None:
    gate, executor = Gate(), DaemonExecutor()
    futures = [executor.submit(gate.call(i)) for i in range(5)]
    gate.wait_inside(2)
    gate.open()
    assert [f.result(WAIT) for f in futures] == list(range(5))
    assert gate.most_inside == 2 and len(gate.threads) == 2
    executor.shutdown()  # nothing to join: returns at once


def test_executor_skips_a_call_cancelled_before_it_ran() -> None:
    gate, executor, ran = Gate(), DaemonExecutor(), threading.Event()
    busy = [executor.submit(gate.call(i)) for i in range(2)]
    gate.wait_inside(2)  # both threads are taken
    skipped = executor.submit(ran.set)
    assert skipped.cancel()
    gate.open()
    assert executor.submit(lambda: "after").result(WAIT) == "after"
    assert [f.result(WAIT) for f in busy] == [0, 1]
    assert skipped.cancelled() and not ran.is_set()
