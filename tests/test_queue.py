"""EventQueue: the callers' queue, its capacity policies and flush barriers.

No worker runs here: the test plays the worker's side (``take``, ``give_back``,
``notify_room``) and records what the queue asks of the engine (start, wake, drop).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from asynctrack._engine.events import Barrier, Event, Job, MetaEvent, Metric
from asynctrack._engine.queue import SHED, EventQueue
from asynctrack.config import EngineConfig, FullPolicy
from asynctrack.errors import QueueFullError


class Engine:
    """What the queue calls back: ``start`` opens it, as the real engine's worker does."""

    def __init__(self) -> None:
        self.starts = self.wakes = self.drops = 0
        self.reasons: list[str] = []
        self.woken = threading.Event()
        self.queue: EventQueue | None = None

    def start(self) -> None:
        self.starts += 1
        assert self.queue is not None
        self.queue.open = True

    def wake(self) -> None:
        self.wakes += 1
        self.woken.set()

    def drop(self, reason: str) -> None:
        self.drops += 1
        self.reasons.append(reason)


def make_queue(
    capacity: int = 100, policy: FullPolicy = "block", timeout: float = 30.0
) -> tuple[EventQueue, Engine]:
    engine = Engine()
    config = EngineConfig(queue_capacity=capacity, full_policy=policy, flush_timeout=timeout)
    engine.queue = EventQueue(
        config, engine.start, engine.wake, engine.drop, lambda: "queue full: server slow"
    )
    return engine.queue, engine


def metric(step: int, run_id: str = "r") -> Metric:
    return (run_id, "loss", float(step), 1.5, step)


async def nothing(context: Any) -> None:
    pass


def test_put_and_take_keep_order() -> None:
    queue, _ = make_queue()
    events = [metric(i) for i in range(5)]
    for event in events:
        queue.put(event)
    assert len(queue) == 5
    assert queue.take(3) == events[:3]
    assert queue.take(10) == events[3:]
    assert queue.take(10) == []


def test_the_first_put_starts_the_worker_once() -> None:
    queue, engine = make_queue()
    assert not queue.open
    queue.put(metric(0))
    queue.put(metric(1))
    assert engine.starts == 1
    assert queue.open


def test_mixed_events_keep_their_order() -> None:
    queue, _ = make_queue()
    events: list[Event] = [
        metric(0), MetaEvent("tag", "r", "t", "v"), Job("r", "artifact", "a.txt", nothing),
        metric(1), MetaEvent("end", "r", "", "FINISHED"),
    ]  # fmt: skip
    for event in events:
        queue.put(event)
    assert queue.take(100) == events


def test_barriers_are_not_counted_as_waiting_events() -> None:
    queue, engine = make_queue()
    queue.put(metric(0))
    queue.put(metric(1))
    barrier = queue.barrier()
    queue.put(metric(2))
    assert isinstance(barrier, Barrier) and not barrier.future.done()
    assert engine.wakes == 1  # a flush wakes the worker at once
    assert (len(queue), queue.waiting()) == (4, 3)
    assert queue.take(2) == [metric(0), metric(1)]
    assert queue.waiting() == 1
    assert queue.take(1) == [barrier]
    assert queue.waiting() == 1
    assert queue.take(1) == [metric(2)]
    assert (len(queue), queue.waiting()) == (0, 0)


def test_a_barrier_alone_starts_the_worker() -> None:
    queue, engine = make_queue()
    queue.barrier()
    assert engine.starts == 1 and queue.waiting() == 0


# ---------------------------------------------------------------------------- full


@pytest.mark.parametrize("policy", ["block", "drop", "raise"])
def test_barriers_and_jobs_always_get_in(policy: FullPolicy) -> None:
    queue, engine = make_queue(capacity=2, policy=policy, timeout=0.01)
    queue.put(metric(0))
    queue.put(metric(1))
    job = Job("r", "artifact", "model.pkl", nothing)
    queue.put(job)
    barrier = queue.barrier()
    assert queue.take(10) == [metric(0), metric(1), job, barrier]
    assert engine.drops == 0


def test_drop_policy_counts_what_it_drops() -> None:
    queue, engine = make_queue(capacity=3, policy="drop")
    for step in range(10):
        queue.put(metric(step))
    assert engine.drops == 7
    assert queue.take(10) == [metric(0), metric(1), metric(2)]
    queue.put(metric(10))  # room again
    assert queue.take(10) == [metric(10)] and engine.drops == 7


def test_raise_policy_raises_with_the_engines_message_and_wakes_the_worker() -> None:
    queue, engine = make_queue(capacity=2, policy="raise")
    queue.put(metric(0))
    queue.put(metric(1))
    with pytest.raises(QueueFullError, match=r"^queue full: server slow$"):
        queue.put(metric(2))
    assert engine.wakes == 1
    assert queue.take(10) == [metric(0), metric(1)]


def test_block_policy_waits_for_room() -> None:
    queue, engine = make_queue(capacity=2, policy="block", timeout=30.0)
    queue.put(metric(0))
    queue.put(metric(1))
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            queue.put(metric(2))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    assert engine.woken.wait(10)  # the caller woke the worker before it waits
    assert len(queue) == 2  # and is still waiting: there is no room
    assert queue.take(1) == [metric(0)]  # the worker makes room...
    queue.notify_room()  # ...and says so
    thread.join(10)
    assert not thread.is_alive() and errors == []
    assert queue.take(10) == [metric(1), metric(2)]


def test_block_policy_waits_once_then_drops_until_there_is_room() -> None:
    queue, engine = make_queue(capacity=1, policy="block", timeout=0.02)
    queue.put(metric(0))
    queue.put(metric(1))  # waits flush_timeout, then drops: training goes on
    assert (engine.wakes, engine.drops) == (1, 1)
    queue.put(metric(2))  # no second wait while there is no room
    assert engine.drops == 2 and engine.reasons == [SHED, SHED]
    assert queue.take(10) == [metric(0)]
    queue.notify_room()  # the worker made room: events are kept again
    queue.put(metric(3))
    assert queue.take(10) == [metric(3)] and engine.drops == 2


# ---------------------------------------------------------------------------- worker side


def test_give_back_puts_events_back_in_front_in_order() -> None:
    queue, _ = make_queue()
    for step in range(3):
        queue.put(metric(step))
    barrier = queue.barrier()
    queue.put(metric(3))
    taken = queue.take(4)
    assert taken == [metric(0), metric(1), metric(2), barrier]
    assert queue.waiting() == 1
    queue.give_back(taken)
    assert queue.waiting() == 4  # the barrier is counted out again
    assert queue.take(10) == [metric(0), metric(1), metric(2), barrier, metric(3)]
    assert queue.waiting() == 0


def test_clear_forgets_everything_and_closes() -> None:
    queue, engine = make_queue()
    queue.put(metric(0))
    queue.barrier()
    queue.clear()
    assert (len(queue), queue.waiting(), queue.open) == (0, 0, False)
    queue.put(metric(1))  # a forked child's first event starts its own worker
    assert engine.starts == 2
    assert queue.take(10) == [metric(1)] and queue.waiting() == 0


def test_capacity_is_the_configured_one() -> None:
    queue, _ = make_queue(capacity=7)
    assert queue.capacity == 7
