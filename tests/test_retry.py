"""RetryPolicy: the one retry rule for live sending, ``asynctrack sync`` and S3 uploads.

The clock the policy sleeps on is replaced by :class:`FakeClock`, so a pause of seconds
takes no time and every pause is recorded exactly; a few tests use the real clock with
millisecond delays to show the policy works unpatched.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import types
from collections.abc import Awaitable, Callable, Iterator

import pytest

from asynctrack._engine import retry
from asynctrack._engine.retry import GaveUp, RetryPolicy
from asynctrack._engine.transport import Held, Refused, Transient

TINY = RetryPolicy(first=0.001, maximum=0.002)


class FakeClock:
    """``time.monotonic`` and both sleeps of the retry module: sleeping advances the time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # Only the retry module's names are replaced; the event loop keeps the real ones.
    monkeypatch.setattr(
        retry, "time", types.SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep)
    )
    monkeypatch.setattr(retry, "asyncio", types.SimpleNamespace(sleep=fake.async_sleep))
    return fake


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "random", types.SimpleNamespace(uniform=lambda a, b: 1.0))


def flaky(failures: list[Exception], result: str = "ok") -> Callable[[], str]:
    """A blocking call that raises each of ``failures`` in turn, then returns ``result``."""
    pending = iter(failures)

    def call() -> str:
        for exc in pending:
            raise exc
        return result

    return call


def async_of(call: Callable[[], str]) -> Callable[[], Awaitable[str]]:
    async def wrapped() -> str:
        return call()

    return wrapped


Mode = Callable[[RetryPolicy, Callable[[], str], Callable[[Transient], None]], str | Refused | Held]


def run_async(
    policy: RetryPolicy, call: Callable[[], str], on_transient: Callable[[Transient], None]
) -> str | Refused | Held:
    return asyncio.run(policy.attempt(async_of(call), on_transient))


def run_blocking(
    policy: RetryPolicy, call: Callable[[], str], on_transient: Callable[[Transient], None]
) -> str | Refused | Held:
    return policy.attempt_blocking(call, on_transient)


@pytest.fixture(params=[run_async, run_blocking], ids=["attempt", "attempt_blocking"])
def attempt(request: pytest.FixtureRequest) -> Mode:
    mode: Mode = request.param
    return mode


def ignore(exc: Transient) -> None:
    pass


# ---------------------------------------------------------------------------- delays


def first_delays(policy: RetryPolicy, count: int) -> list[float]:
    delays: Iterator[float] = policy.delays()
    return [next(delays) for _ in range(count)]


@pytest.mark.usefixtures("no_jitter")
def test_delays_double_from_first_up_to_maximum() -> None:
    assert first_delays(RetryPolicy(first=0.25, maximum=3.0), 7) == [
        0.25, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0
    ]  # fmt: skip


def test_delays_are_jittered_within_half_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "random", random.Random(1234))
    bases = [1.0, 2.0, 4.0, 8.0] + [8.0] * 196
    delays = first_delays(RetryPolicy(first=1.0, maximum=8.0), len(bases))
    ratios = [d / b for d, b in zip(delays, bases, strict=True)]
    assert all(0.5 <= r <= 1.5 for r in ratios)
    assert min(ratios) < 0.6 and max(ratios) > 1.4  # spread over the whole range
    assert len(set(delays)) == len(delays)  # no two processes come back in step


def test_default_policy_waits_forever() -> None:
    policy = RetryPolicy()
    assert (policy.first, policy.maximum, policy.patience) == (0.25, 8.0, math.inf)


# ---------------------------------------------------------------------------- answers


def test_a_result_is_returned(attempt: Mode) -> None:
    assert attempt(TINY, flaky([], "stored"), ignore) == "stored"


def test_a_refusal_is_returned_as_is(attempt: Mode) -> None:
    refusal = Refused("INVALID_PARAMETER_VALUE: no", splittable=False)
    assert attempt(TINY, flaky([refusal]), ignore) is refusal


def test_any_other_exception_is_a_splittable_refusal(attempt: Mode) -> None:
    result = attempt(TINY, flaky([ValueError("cannot encode 1e999")]), ignore)
    assert isinstance(result, Refused)
    assert result.splittable
    assert result.reason == "not sent: ValueError: cannot encode 1e999"


def test_a_long_exception_message_is_shortened(attempt: Mode) -> None:
    result = attempt(TINY, flaky([ValueError("x" * 1000)]), ignore)
    assert isinstance(result, Refused)
    assert result.reason.startswith("not sent: ValueError: xxx")
    assert result.reason.endswith("...") and len(result.reason) == 303


def test_transients_are_retried_until_an_answer(attempt: Mode) -> None:
    failures: list[Exception] = [Transient("HTTP 503"), Transient("HTTP 502"), Transient("reset")]
    seen: list[Transient] = []
    assert attempt(TINY, flaky(failures), seen.append) == "ok"
    assert seen == failures


def test_a_refusal_after_transients_ends_the_attempt(attempt: Mode) -> None:
    refusal = Refused("RESOURCE_DOES_NOT_EXIST: no run", splittable=False)
    seen: list[Transient] = []
    assert attempt(TINY, flaky([Transient("HTTP 503"), refusal]), seen.append) is refusal
    assert len(seen) == 1


def test_cancellation_is_not_a_refusal() -> None:
    async def cancelled() -> str:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(TINY.attempt(cancelled, ignore))


# ---------------------------------------------------------------------------- pauses


@pytest.mark.usefixtures("no_jitter")
def test_pauses_between_transients_follow_the_delays(attempt: Mode, clock: FakeClock) -> None:
    policy = RetryPolicy(first=1.0, maximum=4.0)
    attempt(policy, flaky([Transient("down")] * 5), ignore)
    assert clock.pauses == [1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.usefixtures("no_jitter")
def test_retry_after_is_a_floor_for_the_pause(attempt: Mode, clock: FakeClock) -> None:
    policy = RetryPolicy(first=1.0, maximum=8.0)
    failures: list[Exception] = [
        Transient("HTTP 429", retry_after=30.0),  # longer than the delay: wait for it
        Transient("HTTP 429", retry_after=0.5),  # shorter: the delay (2.0) wins
        Transient("HTTP 503"),  # none: the delay (4.0)
    ]
    assert attempt(policy, flaky(failures), ignore) == "ok"
    assert clock.pauses == [30.0, 2.0, 4.0]


@pytest.mark.usefixtures("no_jitter")
def test_gives_up_after_patience_without_an_answer(attempt: Mode, clock: FakeClock) -> None:
    policy = RetryPolicy(first=1.0, maximum=2.0, patience=4.5)
    seen: list[Transient] = []
    with pytest.raises(GaveUp, match=r"^HTTP 503$"):
        attempt(policy, flaky([Transient("HTTP 503")] * 100), seen.append)
    # 1 + 2 + 1.5 seconds of pauses use the patience up: the last pause is cut to fit it.
    assert clock.pauses == [1.0, 2.0, 1.5]
    assert len(seen) == 4


@pytest.mark.usefixtures("no_jitter")
def test_retry_after_never_outlasts_patience(attempt: Mode, clock: FakeClock) -> None:
    policy = RetryPolicy(first=1.0, maximum=2.0, patience=10.0)
    with pytest.raises(GaveUp, match="slow down"):
        attempt(policy, flaky([Transient("slow down", retry_after=3600.0)] * 2), ignore)
    assert clock.pauses == [10.0]


def test_gave_up_is_raised_with_the_real_clock(attempt: Mode) -> None:
    policy = RetryPolicy(first=0.001, maximum=0.002, patience=0.02)
    started = time.monotonic()
    with pytest.raises(GaveUp, match="gone"):
        attempt(policy, flaky([Transient("gone")] * 10_000), ignore)
    assert time.monotonic() - started < 5.0  # milliseconds, on an idle machine


def test_a_success_within_patience_is_returned(attempt: Mode) -> None:
    policy = RetryPolicy(first=0.001, maximum=0.002, patience=60.0)
    assert attempt(policy, flaky([Transient("blip")] * 3, "late"), ignore) == "late"
