"""Worker: one named daemon thread running one asyncio loop, knowing nothing about events."""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from asynctrack._engine.worker import Worker

WAIT = 10.0  # seconds: a bound for a busy machine, never reached when things work

Main = Callable[[threading.Event], Coroutine[Any, Any, None]]


@pytest.fixture
def make_worker() -> Iterator[Callable[[], Worker]]:
    """``make_worker()``: a Worker with a thread name of its own, stopped after the test."""
    made: list[Worker] = []

    def build() -> Worker:
        worker = Worker(f"test-worker-{uuid.uuid4().hex[:8]}")
        made.append(worker)
        return worker

    yield build
    for worker in made:
        worker.stop(join=WAIT)


async def serve(started: threading.Event) -> None:
    """A main that starts at once and runs until it is cancelled."""
    started.set()
    await asyncio.Event().wait()


def thread_of(worker: Worker) -> threading.Thread:
    async def where() -> threading.Thread:
        return threading.current_thread()

    return worker.run(where(), WAIT)


def test_main_runs_on_a_named_daemon_thread(make_worker: Callable[[], Worker]) -> None:
    worker = make_worker()
    worker.start(serve)
    thread = thread_of(worker)
    assert thread is not threading.current_thread()
    assert thread.daemon and thread.name.startswith("test-worker-")


def test_the_loops_default_executor_is_made_of_daemon_threads(
    make_worker: Callable[[], Worker],
) -> None:
    worker = make_worker()
    worker.start(serve)

    async def lookup() -> threading.Thread:
        return await asyncio.get_running_loop().run_in_executor(None, threading.current_thread)

    thread = worker.run(lookup(), WAIT)
    assert thread.daemon and thread.name == "asynctrack-default-executor"


def test_run_returns_the_result_or_raises_the_exception(make_worker: Callable[[], Worker]) -> None:
    worker = make_worker()
    worker.start(serve)

    async def answer() -> int:
        return 42

    async def fail() -> int:
        raise ValueError("no")

    assert worker.run(answer(), WAIT) == 42
    with pytest.raises(ValueError, match="no"):
        worker.run(fail(), WAIT)


def test_run_gives_up_at_its_timeout(make_worker: Callable[[], Worker]) -> None:
    worker = make_worker()
    worker.start(serve)
    with pytest.raises(TimeoutError):
        worker.run(asyncio.Event().wait(), 0.01)


def test_run_before_start_refuses_and_closes_the_coroutine() -> None:
    async def never() -> None:
        raise AssertionError("never run")

    coro = never()
    with pytest.raises(RuntimeError, match="not running"):
        Worker().run(coro, WAIT)
    assert inspect.getcoroutinestate(coro) == "CORO_CLOSED"  # no "never awaited" warning


def test_call_soon_runs_on_the_loop_and_is_quiet_once_it_is_gone(
    make_worker: Callable[[], Worker],
) -> None:
    worker = make_worker()
    worker.start(serve)
    ran_on: list[threading.Thread] = []
    done = threading.Event()

    def note() -> None:
        ran_on.append(threading.current_thread())
        done.set()

    worker.call_soon(note)
    assert done.wait(WAIT)
    assert ran_on == [thread_of(worker)]
    worker.stop(join=WAIT)
    worker.call_soon(lambda: None)  # the loop is closed: nothing, and no error


def test_stop_cancels_main_and_what_it_left_running(make_worker: Callable[[], Worker]) -> None:
    unwound: list[str] = []

    async def background() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            unwound.append("background")

    async def main(started: threading.Event) -> None:
        asyncio.get_running_loop().create_task(background())
        try:
            await serve(started)
        finally:
            unwound.append("main")

    worker = make_worker()
    worker.start(main)
    thread = thread_of(worker)
    worker.stop(join=WAIT)
    assert not thread.is_alive()
    assert sorted(unwound) == ["background", "main"]


def test_forget_lets_go_of_the_parents_thread_and_loop(make_worker: Callable[[], Worker]) -> None:
    release = threading.Event()

    async def until_released(started: threading.Event) -> None:
        started.set()
        await asyncio.to_thread(release.wait, WAIT)

    worker = make_worker()
    worker.start(until_released)
    thread = thread_of(worker)
    worker.forget()  # as in a forked child
    with pytest.raises(RuntimeError, match="not running"):
        worker.run(asyncio.sleep(0), WAIT)
    worker.stop(join=WAIT)  # nothing to stop here...
    assert thread.is_alive()  # ...and the parent's thread is not touched
    release.set()
    thread.join(WAIT)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_main_that_fails_before_it_starts_does_not_hang_start(
    make_worker: Callable[[], Worker],
) -> None:
    worker, ran_on = make_worker(), queue.SimpleQueue[threading.Thread]()

    async def broken(started: threading.Event) -> None:
        ran_on.put(threading.current_thread())
        raise PermissionError(13, "Permission denied", "/spool/other-user")

    outcome: list[BaseException | None] = []

    def caller() -> None:
        try:
            worker.start(broken)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    calling = threading.Thread(target=caller, daemon=True)  # left behind if start() hangs
    calling.start()
    ran_on.get(timeout=WAIT).join(WAIT)  # the worker's thread is gone...
    calling.join(1.0)  # ...so start() has nothing left to wait for
    assert outcome, "Worker.start() is still waiting for a main that has failed"
    assert isinstance(outcome[0], PermissionError)
