"""The adaptive limiter of requests to one server, on a fake clock: no test here waits."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest

from asynctrack._engine import limiter as limiter_mod
from asynctrack._engine.limiter import Limiter, Outcome, Token, limiter_for
from asynctrack._engine.transport import outcome_of


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:  # time passes at once
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    limiter_mod._registry.clear()
    yield
    limiter_mod._registry.clear()


def make(clock: FakeClock, max_limit: int = 16) -> Limiter:
    return Limiter(max_limit, clock=clock, sleep=clock.sleep)


async def round_trip(
    limiter: Limiter, clock: FakeClock, latency: float, outcome: Outcome = Outcome.OK
) -> None:
    """A round of requests that fills every slot, each answered after ``latency``."""
    tokens = [await limiter.acquire() for _ in range(limiter.limit)]
    clock.now += latency
    for token in tokens:
        token.done(outcome)
    assert limiter.in_flight == 0


async def test_starts_small_and_grows_to_max_while_latency_holds(clock: FakeClock) -> None:
    limiter = make(clock, max_limit=10)
    assert limiter.limit == limiter_mod.INITIAL_LIMIT
    seen = []
    for _ in range(12):
        await round_trip(limiter, clock, 0.1)
        seen.append(limiter.limit)
    assert seen[:3] == [4, 8, 10]  # slow start: doubling per round
    assert seen[-1] == 10  # and never beyond max


async def test_after_the_first_push_back_grows_by_one_per_round(clock: FakeClock) -> None:
    limiter = make(clock, max_limit=16)
    for _ in range(3):
        await round_trip(limiter, clock, 0.1)
    assert limiter.limit == 16
    await round_trip(limiter, clock, 0.1, outcome_of(503))
    seen = [limiter.limit]
    for _ in range(3):
        await round_trip(limiter, clock, 0.1)
        seen.append(limiter.limit)
    assert seen == [8, 9, 10, 11]  # additive from here on


async def test_an_idle_sender_does_not_grow(clock: FakeClock) -> None:
    limiter = make(clock, max_limit=10)
    for _ in range(5):
        await round_trip(limiter, clock, 0.1)
    before = limiter.limit
    for _ in range(50):  # one request at a time never tests the extra slots
        token = await limiter.acquire()
        clock.now += 0.1
        token.done(Outcome.OK)
    assert limiter.limit == before


async def grown(clock: FakeClock, rounds: int = 8) -> Limiter:
    limiter = make(clock)
    for _ in range(rounds):
        await round_trip(limiter, clock, 0.1)
    return limiter


async def test_shrinks_once_per_round_when_latency_grows(clock: FakeClock) -> None:
    limiter = await grown(clock)
    before = limiter.limit
    await round_trip(limiter, clock, 0.5)  # five times slower: the server is queueing
    after_one = limiter.limit
    assert after_one == int(before * limiter_mod.SLOWER) < before
    await round_trip(limiter, clock, 0.5)
    assert limiter.limit < after_one
    for _ in range(40):  # slow but steady: the new latency becomes the usual one
        await round_trip(limiter, clock, 0.5)
    steady = limiter.limit
    await round_trip(limiter, clock, 0.5)
    assert limiter.limit >= steady


@pytest.mark.parametrize(
    "outcome", [outcome_of(429), outcome_of(503), Outcome.TIMEOUT, outcome_of(500)]
)
async def test_halves_on_overload_and_timeout(clock: FakeClock, outcome: Outcome) -> None:
    limiter = await grown(clock)
    before = limiter.limit
    await round_trip(limiter, clock, 0.1, outcome)
    # every request of the round failed, yet one congestion means one decrease
    assert limiter.limit == int(before * limiter_mod.OVERLOAD)


async def test_never_below_one(clock: FakeClock) -> None:
    limiter = await grown(clock)
    for _ in range(10):
        await round_trip(limiter, clock, 30.0, Outcome.TIMEOUT)
    assert limiter.limit == 1
    await round_trip(limiter, clock, 30.0, Outcome.TIMEOUT)
    assert limiter.limit == 1


async def test_errors_say_nothing_about_load(clock: FakeClock) -> None:
    limiter = await grown(clock)
    before = limiter.limit
    await round_trip(limiter, clock, 0.001, Outcome.ERROR)
    assert limiter.limit == before


def test_answers_sorted_by_what_they_say_about_load() -> None:
    pool = "BAD_REQUEST: QueuePool limit of size 5 overflow 10 reached, connection timed out"
    assert outcome_of(400, '{"error_code": "BAD_REQUEST", "message": "' + pool + '"}') is (
        Outcome.OVERLOAD
    )
    assert outcome_of(400, "database is locked") is Outcome.OVERLOAD
    assert outcome_of(400, "Changing param values is not allowed") is Outcome.OK
    assert outcome_of(200) is Outcome.OK
    assert outcome_of(404) is Outcome.OK
    assert outcome_of(502) is outcome_of(504) is outcome_of(408) is Outcome.OVERLOAD


async def test_waits_for_a_free_slot(clock: FakeClock) -> None:
    limiter = make(clock, max_limit=1)
    first = await limiter.acquire()
    second = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    assert not second.done()
    first.done(Outcome.OK)
    token = await second
    assert limiter.in_flight == 1
    token.done(Outcome.OK)
    token.done(Outcome.OK)  # a second done() changes nothing
    assert limiter.in_flight == 0


async def test_a_cancelled_waiter_passes_its_slot_on(clock: FakeClock) -> None:
    limiter = make(clock, max_limit=1)
    first = await limiter.acquire()
    cancelled = asyncio.ensure_future(limiter.acquire())
    third = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    first.done(Outcome.OK)  # granted to the waiter that is cancelled before it runs
    cancelled.cancel()
    token = await third
    assert cancelled.cancelled()
    assert limiter.in_flight == 1
    token.done(Outcome.OK)


async def test_slot_context_manager(clock: FakeClock) -> None:
    limiter = make(clock)
    async with limiter.slot() as token:
        assert limiter.in_flight == 1
    assert token.finished and limiter.in_flight == 0
    with pytest.raises(KeyError):
        async with limiter.slot():
            raise KeyError("boom")
    assert limiter.in_flight == 0


async def test_retry_after_holds_every_sender(clock: FakeClock) -> None:
    limiter = await grown(clock)
    token = await limiter.acquire()
    token.done(Outcome.OVERLOAD, retry_after=5.0)
    assert limiter.delay() == 5.0
    clock.now += 3.0
    assert limiter.delay() == 2.0
    limiter.backoff_until(clock.now + 1.0)  # an earlier deadline does not shorten it
    assert limiter.delay() == 2.0
    token = await limiter.acquire()
    assert clock.slept == [2.0] and limiter.delay() == 0.0
    token.done(Outcome.OK)
    limiter.backoff_until(clock.now + 86400.0)  # a server asking for a day gets a bound
    assert limiter.delay() == limiter_mod.MAX_BACKOFF


def test_one_limiter_per_server() -> None:
    a = limiter_for("http://127.0.0.1:5000", 4)
    assert limiter_for("http://127.0.0.1:5000/prefix", 4) is a
    assert limiter_for("HTTP://127.0.0.1:5000/", 2) is a
    assert limiter_for("http://127.0.0.1:5001", 4) is not a
    assert limiter_for("https://127.0.0.1:5000", 4) is not a
    assert limiter_for("http://example.org", 4) is limiter_for("http://example.org:80", 4)
    assert limiter_for("http://127.0.0.1:5000", 8).max_limit == 8  # the largest bound


def _loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return loop, thread


def test_two_engines_share_the_slots_of_one_server() -> None:
    """Two event loops on two threads, as two engines of one process run."""
    url = "http://127.0.0.1:5999"
    limiter = limiter_for(url, 1)
    (loop_a, thread_a), (loop_b, thread_b) = _loop_thread(), _loop_thread()
    try:
        first: Token = asyncio.run_coroutine_threadsafe(
            limiter_for(url, 1).acquire(), loop_a
        ).result(10)
        second = asyncio.run_coroutine_threadsafe(limiter_for(url, 1).acquire(), loop_b)
        other = asyncio.run_coroutine_threadsafe(limiter_for(url + "0", 1).acquire(), loop_b)
        other.result(10).done(Outcome.OK)  # another server: not held up
        assert not second.done()  # cannot finish: the only slot is taken
        first.done(Outcome.OK)  # from this thread, neither loop's
        second.result(10).done(Outcome.OK)
        assert limiter.in_flight == 0
    finally:
        for loop, thread in ((loop_a, thread_a), (loop_b, thread_b)):
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def test_forked_child_starts_afresh() -> None:
    url = "http://127.0.0.1:5998"
    parent = limiter_for(url, 8)
    held = asyncio.run(parent.acquire())
    parent.backoff_until(parent._clock() + 100.0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            child = limiter_for(url, 8)
            report = (
                f"{child is parent} {child.in_flight} {parent.in_flight} "
                f"{child.delay() == 0} {parent.limit}"
            )
            held.done(Outcome.TIMEOUT)  # the parent's request means nothing here
            report += f" {parent.in_flight} {parent.limit}"
            os.write(write, report.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    initial = str(limiter_mod.INITIAL_LIMIT)
    assert report.split() == ["False", "0", "0", "True", initial, "0", initial]
    assert parent.in_flight == 1  # the parent's own limiter is untouched
    held.done(Outcome.OK)


async def test_request_timeout_doubles_per_round_of_timeouts_and_comes_back(
    clock: FakeClock,
) -> None:
    limiter = await grown(clock)
    assert limiter.request_timeout(30.0) == 30.0
    await round_trip(limiter, clock, 30.0, Outcome.TIMEOUT)
    assert limiter.request_timeout(30.0) == 60.0  # one round, one doubling
    for _ in range(10):
        await round_trip(limiter, clock, 30.0, Outcome.TIMEOUT)
    assert limiter.request_timeout(30.0) == 30.0 * limiter_mod.MAX_TIMEOUT_SCALE
    for _ in range(200):  # answers, fast again: back to what was configured
        await round_trip(limiter, clock, 0.01)
    assert limiter.request_timeout(30.0) == 30.0


async def test_request_timeout_is_never_below_a_few_recent_latencies(clock: FakeClock) -> None:
    limiter = make(clock)
    for _ in range(20):
        await round_trip(limiter, clock, 2.0)
    assert limiter.request_timeout(1.0) == pytest.approx(limiter_mod._TIMEOUT_LATENCIES * 2.0)
