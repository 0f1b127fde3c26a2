"""Dispatcher: every rule of delivery, driven directly with a fake source and transport.

:class:`ListSource` hands out ``(segment, events)`` chunks and records acks and finished
jobs; :class:`FakeTransport` records calls, refuses any request holding a key ``"bad"``
and can fail transiently. Where the order in time matters (a run's end, a barrier, the
number of requests at once), the transport holds its calls at a gate the test opens, so
what must wait is seen waiting; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from asynctrack._engine.dispatcher import Dispatcher
from asynctrack._engine.events import Barrier, Job, MetaEvent, Metric
from asynctrack._engine.jobs import JobContext, Resources
from asynctrack._engine.kept import Kept
from asynctrack._engine.ledger import Ledger
from asynctrack._engine.limiter import Outcome
from asynctrack._engine.retry import GaveUp, RetryPolicy
from asynctrack._engine.stats import FileCounters
from asynctrack._engine.transport import Held, KeyValue, Refused, Transient
from asynctrack.config import EngineConfig
from asynctrack.errors import Rejection

T = TypeVar("T")

WAIT = 10.0  # seconds: a bound for a busy machine, never reached when things work
TINY = RetryPolicy(first=0.001, maximum=0.002)


# ---------------------------------------------------------------------------- fakes


class ListSource:
    """The dispatcher's source: a list of chunks; remembers acks and finished jobs."""

    def __init__(self, chunks: Sequence[tuple[int, list[Any]]] = ()) -> None:
        self.chunks: deque[tuple[int, list[Any]]] = deque(chunks)
        self.acks: list[tuple[int, int]] = []
        self.done: list[tuple[str, int, bool]] = []
        self.settled_chunks: list[tuple[int, bool]] = []  # each report: (chunks, now)
        self.reported = asyncio.Event()

    def next_chunk(self) -> tuple[int, list[Any]] | None:
        return self.chunks.popleft() if self.chunks else None

    def ack(self, segment: int, count: int) -> None:
        self.acks.append((segment, count))

    def note_done(self, job: Job, segment: int, stored: bool) -> None:
        self.done.append((job.label, segment, stored))

    def settled(self, chunks: int, now: bool) -> None:
        self.settled_chunks.append((chunks, now))
        self.reported.set()

    async def until_settled(self, chunks: int) -> None:
        while self.settled_chunks[-1][0] < chunks:
            self.reported.clear()
            await asyncio.wait_for(self.reported.wait(), WAIT)

    def acked(self) -> dict[int, int]:
        total: Counter[int] = Counter()
        for segment, count in self.acks:
            total[segment] += count
        return {segment: count for segment, count in total.items() if count}


@dataclass
class Call:
    run_id: str
    metrics: list[Metric]
    params: list[KeyValue]
    tags: list[KeyValue]

    def all_keys(self) -> list[str]:
        return [m[1] for m in self.metrics] + [k for k, _ in self.params + self.tags]


class FakeTransport:
    """Refuses (splittable, unless ``whole``) any request with a key or run ``"bad"``;
    raises Transient for the first ``transient`` calls; holds every call while ``gate``
    is closed."""

    def __init__(self, transient: int = 0, whole: bool = False, gated: bool = False) -> None:
        self.transient = transient
        self.whole = whole
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.attempts = 0
        self.stored: list[Call] = []
        self.ends: list[tuple[str, str]] = []
        self.log: list[str] = []  # "batch <run>" and "end <run>", in the order they are stored
        self.held_tags: dict[str, dict[str, str]] = {}  # run -> tags, as the server holds them
        self.reads = 0
        self.inside = self.most_inside = 0
        self._changed = threading.Condition()
        #: runs the server refuses for credentials ("*": every run, a wrong password)
        self.denied: set[str] = set()
        self.refreshes = 0

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric],
        params: Sequence[KeyValue],
        tags: Sequence[KeyValue],
    ) -> None:
        call = Call(run_id, list(metrics), list(params), list(tags))
        with self._changed:
            self.attempts += 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self._changed.notify_all()
        try:
            assert self.gate.wait(WAIT)
            with self._changed:
                if self.transient:
                    self.transient -= 1
                    raise Transient("HTTP 503")
                self._check_access(run_id)
                if "bad" in call.all_keys():
                    raise Refused("INVALID_PARAMETER_VALUE: bad key", splittable=not self.whole)
                self.stored.append(call)
                self.log.append(f"batch {run_id}")
                self.held_tags.setdefault(run_id, {}).update(call.tags)
        finally:
            with self._changed:
                self.inside -= 1

    def _check_access(self, run_id: str) -> None:
        if "*" in self.denied:
            raise Held("HTTP 401: You are not authenticated")
        if run_id in self.denied:
            raise Held("HTTP 403: Permission denied")

    def refresh(self) -> None:
        with self._changed:
            self.refreshes += 1

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        assert end_time > 0
        with self._changed:
            self._check_access(run_id)
            if run_id == "bad":
                raise Refused("RESOURCE_DOES_NOT_EXIST: no such run", splittable=False)
            self.ends.append((run_id, status))
            self.log.append(f"end {run_id}")

    def run_status(self, run_id: str) -> str:
        return "RUNNING"

    def run_tags(self, run_id: str) -> dict[str, str]:
        with self._changed:
            self.reads += 1
            self.log.append(f"read {run_id}")
            return dict(self.held_tags.get(run_id, {}))

    async def until_inside(self, count: int) -> None:
        def wait() -> None:
            with self._changed:
                assert self._changed.wait_for(lambda: self.inside >= count, WAIT)

        await asyncio.to_thread(wait)

    def metrics(self, run_id: str | None = None) -> list[Metric]:
        return [m for c in self.stored if run_id in (None, c.run_id) for m in c.metrics]


class Context:
    """A job's whole view of the engine (:class:`JobContext`)."""

    def __init__(self) -> None:
        self.config = EngineConfig()
        self.resources = Resources()
        self._files = FileCounters()
        self.transients: list[str] = []

    @property
    def files(self) -> FileCounters:
        return self._files

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    def note_transient(self, reason: str) -> None:
        self.transients.append(reason)

    def spooled(self) -> int:
        return 0


@pytest.fixture
def make() -> Iterator[Callable[..., Dispatcher]]:
    """``make(source, transport, ...)``: a Dispatcher whose sender threads end with the test."""
    made: list[Dispatcher] = []

    def build(
        source: ListSource,
        transport: FakeTransport,
        ledger: Ledger | None = None,
        jobs: JobContext | None = None,
        max_in_flight: int = 4,
        policy: RetryPolicy = TINY,
        kept: Kept | None = None,
        retry_kept: bool = True,
    ) -> Dispatcher:
        dispatcher = Dispatcher(
            source, transport, ledger or Ledger(), jobs, max_in_flight, policy, None,
            kept or Kept(first=0.001, longest=0.002), retry_kept,
        )  # fmt: skip
        made.append(dispatcher)
        return dispatcher

    yield build
    for dispatcher in made:
        dispatcher.close()


def metric(run_id: str, step: int, key: str = "loss") -> Metric:
    return (run_id, key, float(step), 1_700_000_000.5, step)


def param(run_id: str, key: str, value: str) -> MetaEvent:
    return MetaEvent("param", run_id, key, value)


def tag(run_id: str, key: str, value: str) -> MetaEvent:
    return MetaEvent("tag", run_id, key, value)


def end(run_id: str, status: str = "FINISHED") -> MetaEvent:
    return MetaEvent("end", run_id, "", status)


def chunks(segment: int, events: list[Any], size: int = 256) -> list[tuple[int, list[Any]]]:
    """``events`` cut as intake cuts them: 256 a chunk."""
    return [(segment, events[i : i + size]) for i in range(0, len(events), size)]


def counted(events: list[Any]) -> int:
    """Events the engine's ledger takes on (barriers are not events)."""
    return sum(1 for e in events if type(e) is not Barrier)


async def deliver(dispatcher: Dispatcher) -> None:
    await dispatcher.pump(due=True)
    await dispatcher.settle()


async def let_run(times: int = 20) -> None:
    """Give every ready task on the loop its turns (a yield, not a wait)."""
    for _ in range(times):
        await asyncio.sleep(0)


def rejected(ledger: Ledger) -> list[tuple[str, str, str]]:
    return sorted((r.run_id, r.kind, r.key) for r in ledger.all_rejections())


# ---------------------------------------------------------------------------- metrics


async def test_metrics_are_batched_per_run_at_most_1000_a_call(
    make: Callable[..., Dispatcher],
) -> None:
    events = [metric("a", i) for i in range(2500)]
    for i in range(10):
        events.insert(i * 250, metric("b", i))
    ledger, transport = Ledger(), FakeTransport()
    ledger.took(len(events))
    await deliver(make(ListSource(chunks(1, events)), transport, ledger))
    sizes = sorted((c.run_id, len(c.metrics)) for c in transport.stored)
    assert sizes == [("a", 500), ("a", 1000), ("a", 1000), ("b", 10)]
    assert sorted(transport.metrics("a")) == sorted(e for e in events if e[0] == "a")
    assert sorted(transport.metrics("b")) == [metric("b", i) for i in range(10)]
    assert all(not c.params and not c.tags for c in transport.stored)
    assert (ledger.sent, ledger.batches, ledger.held, ledger.in_flight) == (2510, 4, 0, 0)


async def test_full_batches_go_at_once_partial_ones_when_due(
    make: Callable[..., Dispatcher],
) -> None:
    transport = FakeTransport()
    dispatcher = make(ListSource(chunks(1, [metric("a", i) for i in range(1500)])), transport)
    await dispatcher.pump(due=False)
    assert dispatcher.partial == 500
    await dispatcher.pump(due=True)
    assert dispatcher.partial == 0
    await dispatcher.settle()
    assert sorted(len(c.metrics) for c in transport.stored) == [500, 1000]


async def test_transient_failures_are_retried_and_counted(
    make: Callable[..., Dispatcher],
) -> None:
    ledger, transport = Ledger(), FakeTransport(transient=2)
    await deliver(make(ListSource([(1, [metric("a", i) for i in range(5)])]), transport, ledger))
    assert transport.attempts == 3
    assert len(transport.metrics()) == 5
    assert (ledger.sent, ledger.retried, ledger.last_error) == (5, 10, "HTTP 503")


# ---------------------------------------------------------------------------- params, tags


async def test_params_and_tags_in_order_the_last_tag_wins_and_folds_count_as_stored(
    make: Callable[..., Dispatcher],
) -> None:
    events = [
        param("a", "lr", "0.1"),
        tag("a", "phase", "warmup"),
        tag("a", "owner", "ml"),
        param("a", "depth", "3"),
        tag("a", "phase", "train"),  # set twice: only the last value is sent
        param("a", "lr", "0.1"),  # logged twice with an equal value: sent once
    ]
    ledger, source, transport = Ledger(), ListSource([(1, events)]), FakeTransport()
    ledger.took(len(events))
    await deliver(make(source, transport, ledger))
    (call,) = transport.stored
    assert call.params == [("lr", "0.1"), ("depth", "3")]
    assert call.tags == [("owner", "ml"), ("phase", "train")]
    assert (ledger.sent, ledger.batches, ledger.held) == (6, 1, 0)
    assert source.acked() == {1: 6}


async def test_a_runs_tags_over_many_requests_are_sent_one_request_at_a_time_in_order(
    make: Callable[..., Dispatcher],
) -> None:
    events = [tag("a", f"t{i}", str(i)) for i in range(250)] + [tag("a", "t0", "last")]
    transport = FakeTransport()
    await deliver(make(ListSource(chunks(1, events)), transport, max_in_flight=4))
    assert transport.most_inside == 1  # one lane per run: never two requests at once
    sent = [kv for c in transport.stored for kv in c.tags]
    assert sent == [(f"t{i}", str(i)) for i in range(250)] + [("t0", "last")]


class Ghosting(FakeTransport):
    """The first request carrying the tag ``key`` gets no answer in time, yet the server
    has it: it is kept aside, to reach the server's state when the test calls ``land``."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.ghosts: list[Call] = []

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric],
        params: Sequence[KeyValue],
        tags: Sequence[KeyValue],
    ) -> None:
        if not self.ghosts and any(k == self.key for k, _ in tags):
            self.ghosts.append(Call(run_id, list(metrics), list(params), list(tags)))
            raise Transient("TimeoutError: timed out", outcome=Outcome.TIMEOUT)
        super().log_batch(run_id, metrics, params, tags)

    def land(self) -> None:
        with self._changed:
            for call in self.ghosts:
                self.held_tags.setdefault(call.run_id, {}).update(call.tags)
                self.log.append(f"ghost {call.run_id}")


async def test_a_tag_overwritten_by_its_late_first_attempt_is_set_again_before_the_run_ends(
    make: Callable[..., Dispatcher],
) -> None:
    ledger, source, transport = Ledger(), ListSource(), Ghosting("stage")
    dispatcher = make(source, transport, ledger)
    ledger.took(7)
    source.chunks.append((1, [tag("a", "stage", "old"), tag("a", "owner", "ml")]))
    await deliver(dispatcher)  # the first attempt times out; the retry is stored
    source.chunks.append((1, [tag("a", "stage", "new"), tag("b", "stage", "b1")]))
    source.chunks.append((1, [param("a", "lr", "0.1")]))
    await deliver(dispatcher)
    transport.land()  # the first attempt reaches the server only now: stage=old again
    del transport.held_tags["a"]["owner"]  # deleted by the user (MLflow's delete_tag)
    transport.held_tags["a"]["other"] = "x"  # set by someone else: not this process's
    source.chunks.append((1, [end("a"), end("b")]))
    await deliver(dispatcher)
    assert transport.held_tags == {"a": {"stage": "new", "other": "x"}, "b": {"stage": "b1"}}
    assert transport.log[-4:] == ["read a", "batch a", "end a", "end b"]
    assert transport.stored[-1].tags == [("stage", "new")]
    assert transport.reads == 1  # run b never had a failed attempt: nothing read for it
    assert (ledger.sent, ledger.done, ledger.held, ledger.rejected) == (5, 2, 0, 0)


async def test_a_flush_sets_a_late_overwritten_tag_again_and_the_run_end_checks_once_more(
    make: Callable[..., Dispatcher],
) -> None:
    source, transport = ListSource(), Ghosting("stage")
    dispatcher = make(source, transport)
    source.chunks.append((1, [tag("a", "stage", "old")]))
    await deliver(dispatcher)
    source.chunks.append((1, [tag("a", "stage", "new")]))
    await deliver(dispatcher)
    transport.land()
    barrier = Barrier()
    source.chunks.append((1, [barrier]))
    await deliver(dispatcher)
    assert barrier.future.done()
    assert transport.held_tags["a"] == {"stage": "new"}
    transport.land()  # a copy held even longer (a second proxy, say)
    source.chunks.append((1, [end("a")]))
    await deliver(dispatcher)
    assert transport.held_tags["a"] == {"stage": "new"}
    assert transport.reads == 2
    assert transport.log[-3:] == ["read a", "batch a", "end a"]


async def test_a_run_whose_tags_never_failed_ends_without_a_read(
    make: Callable[..., Dispatcher],
) -> None:
    source, transport = ListSource([(1, [metric("a", 0)])]), FakeTransport(transient=2)
    dispatcher = make(source, transport)
    await deliver(dispatcher)  # two failed attempts, of metrics only (idempotent)
    source.chunks.append((1, [tag("a", "t", "v"), Barrier(), end("a")]))
    await deliver(dispatcher)
    assert transport.reads == 0
    assert transport.log == ["batch a", "batch a", "end a"]


# ---------------------------------------------------------------------------- refusals


async def test_a_refused_request_is_split_until_only_the_bad_events_are_refused(
    make: Callable[..., Dispatcher],
) -> None:
    metrics = [metric("a", i, "bad" if i in (3, 37) else f"m{i}") for i in range(64)]
    meta = [param("a", "lr", "0.1"), param("a", "bad", "x"), tag("a", "ok", "y")]
    events = [*metrics, *meta, metric("b", 0)]
    ledger, source, transport = Ledger(), ListSource([(1, events)]), FakeTransport()
    ledger.took(len(events))
    await deliver(make(source, transport, ledger))
    assert rejected(ledger) == [
        ("a", "metric", "bad"),
        ("a", "metric", "bad"),
        ("a", "param", "bad"),
    ]
    assert {r.reason for r in ledger.all_rejections()} == {"INVALID_PARAMETER_VALUE: bad key"}
    good = [m for m in metrics if m[1] != "bad"]
    assert sorted(transport.metrics("a")) == sorted(good)
    assert transport.metrics("b") == [metric("b", 0)]
    stored_meta = [kv for c in transport.stored for kv in c.params + c.tags]
    assert sorted(stored_meta) == [("lr", "0.1"), ("ok", "y")]
    assert (ledger.sent, ledger.rejected, ledger.held) == (len(events) - 3, 3, 0)
    assert source.acked() == {1: len(events)}


async def test_a_whole_request_refusal_is_not_split(make: Callable[..., Dispatcher]) -> None:
    events = [metric("a", i, "bad" if i == 0 else "loss") for i in range(10)]
    ledger, transport = Ledger(), FakeTransport(whole=True)
    await deliver(make(ListSource([(1, events)]), transport, ledger))
    assert transport.attempts == 1
    assert ledger.rejected == 10 and ledger.sent == 0


async def test_a_value_that_cannot_be_encoded_is_refused_alone(
    make: Callable[..., Dispatcher],
) -> None:
    class Encoding(FakeTransport):
        def log_batch(self, run_id: str, metrics: Sequence[Metric], *rest: Any) -> None:
            if any(m[2] != m[2] for m in metrics):  # NaN stands for "cannot be encoded"
                raise ValueError("cannot encode NaN")
            super().log_batch(run_id, metrics, *rest)

    events = [metric("a", i) for i in range(8)]
    events[5] = ("a", "odd", float("nan"), 1.0, 5)
    ledger, transport = Ledger(), Encoding()
    await deliver(make(ListSource([(1, events)]), transport, ledger))
    (rejection,) = ledger.all_rejections()
    assert rejection == Rejection("a", "metric", "odd", "not sent: ValueError: cannot encode NaN")
    assert len(transport.metrics()) == 7


# ---------------------------------------------------------------------------- held back


async def test_a_refused_credential_keeps_the_events_and_other_runs_flow(
    make: Callable[..., Dispatcher],
) -> None:
    events: list[Any] = [metric("a", i) for i in range(5)] + [metric("b", i) for i in range(5)]
    events += [tag("a", "t", "1"), end("a"), end("b")]
    barrier = Barrier()
    ledger, source, transport = Ledger(), ListSource([(1, [*events, barrier])]), FakeTransport()
    transport.denied.add("a")  # a permission missing for run a's experiment
    ledger.took(len(events))
    dispatcher = make(source, transport, ledger)
    await deliver(dispatcher)
    assert barrier.future.done()  # the server answered: nothing to wait out
    assert transport.metrics("b") == [metric("b", i) for i in range(5)]
    assert transport.ends == [("b", "FINISHED")]
    assert (dispatcher.kept.events, dispatcher.kept.by_run) == (7, {"a": 7})
    assert dispatcher.kept.reason == "HTTP 403: Permission denied"
    assert (ledger.held, ledger.rejected, source.acked()) == (7, 0, {1: 6})
    assert source.settled_chunks[-1][0] == 0  # the spool keeps the chunk: nothing forgotten

    transport.denied.clear()  # granted: the next round delivers, with credentials re-read
    rounds = dispatcher.recovery.task
    assert rounds is not None
    await asyncio.wait_for(rounds, WAIT)  # it ends once nothing is held back
    assert not dispatcher.kept
    await dispatcher.settle()
    assert sorted(transport.metrics("a")) == [metric("a", i) for i in range(5)]
    assert transport.held_tags["a"] == {"t": "1"}
    assert transport.log[-1] == "end a"  # the run ends after its events
    assert (ledger.held, ledger.rejected, source.acked()) == (0, 0, {1: 13})
    assert transport.refreshes >= 1
    await source.until_settled(1)


async def test_params_and_tags_held_back_keep_their_order(
    make: Callable[..., Dispatcher],
) -> None:
    transport = FakeTransport()
    transport.denied.add("*")  # a wrong password: every request
    source = ListSource([(1, [tag("a", "t", "first")])])
    dispatcher = make(source, transport, kept=Kept(first=3600))  # no round during the test
    await deliver(dispatcher)
    attempts = transport.attempts
    source.chunks.append((1, [tag("a", "t", "second"), param("a", "p", "1")]))
    await deliver(dispatcher)
    assert transport.attempts == attempts  # parked behind the first, not sent
    assert dispatcher.kept.events == 3
    transport.denied.clear()
    await dispatcher.recovery.round()  # one round, as the recovery makes them
    assert transport.held_tags["a"] == {"t": "second"}  # the last set_tag still wins
    assert [c.tags for c in transport.stored] == [[("t", "first")], [("t", "second")]]


async def test_sync_leaves_what_is_held_back_on_disk(make: Callable[..., Dispatcher]) -> None:
    ledger, source, transport = Ledger(), ListSource([(1, [metric("a", 0)])]), FakeTransport()
    transport.denied.add("*")
    ledger.took(1)
    dispatcher = make(source, transport, ledger, retry_kept=False)
    await deliver(dispatcher)
    await let_run()
    assert dispatcher.kept.events == 1 and source.acked() == {}
    assert (transport.attempts, transport.refreshes) == (1, 0)  # no second try


# ---------------------------------------------------------------------------- order in time


async def test_a_run_end_waits_for_the_runs_earlier_events(
    make: Callable[..., Dispatcher],
) -> None:
    events = [metric("a", i) for i in range(5)] + [tag("a", "t", "v"), end("a")]
    ledger, source, transport = Ledger(), ListSource([(1, events)]), FakeTransport(gated=True)
    ledger.took(len(events))
    pumping = asyncio.ensure_future(make(source, transport, ledger).pump(due=True))
    await transport.until_inside(2)  # the metrics and the tag are being sent...
    await let_run()
    assert transport.ends == []  # ...and the end waits for them
    transport.gate.set()
    await asyncio.wait_for(pumping, WAIT)
    assert transport.log[-1] == "end a" and sorted(transport.log[:-1]) == ["batch a"] * 2
    assert transport.ends == [("a", "FINISHED")]
    assert (ledger.sent, ledger.done, ledger.held) == (6, 1, 0)
    assert source.acked() == {1: 7}


async def test_a_run_end_waits_for_jobs_queued_before_it(make: Callable[..., Dispatcher]) -> None:
    release = asyncio.Event()

    async def upload(context: Any) -> None:
        await release.wait()

    events = [Job("a", "artifact", "model.pkl", upload), end("a")]
    transport = FakeTransport()
    pumping = asyncio.ensure_future(
        make(ListSource([(1, events)]), transport, jobs=Context()).pump(True)
    )
    await let_run()
    assert transport.ends == []
    release.set()
    await asyncio.wait_for(pumping, WAIT)
    assert transport.ends == [("a", "FINISHED")]


async def test_a_refused_run_end_is_named_by_its_run(make: Callable[..., Dispatcher]) -> None:
    ledger, source = Ledger(), ListSource([(2, [end("bad", "KILLED")])])
    await deliver(make(source, FakeTransport(), ledger))
    (rejection,) = ledger.all_rejections()
    assert rejection == Rejection("bad", "run", "status", "RESOURCE_DOES_NOT_EXIST: no such run")
    assert source.acked() == {2: 1}


async def test_a_barrier_resolves_only_after_everything_before_it(
    make: Callable[..., Dispatcher],
) -> None:
    barrier = Barrier()
    events = [metric("a", 0), metric("a", 1), tag("b", "t", "v"), barrier, metric("a", 2)]
    ledger, transport = Ledger(), FakeTransport(gated=True)
    sent_when_resolved: list[int] = []
    barrier.future.add_done_callback(lambda _: sent_when_resolved.append(ledger.sent))
    dispatcher = make(ListSource([(1, events)]), transport, ledger)
    pumping = asyncio.ensure_future(dispatcher.pump(due=False))
    await transport.until_inside(2)
    await let_run()
    assert not barrier.future.done()
    transport.gate.set()
    await asyncio.wait_for(pumping, WAIT)
    assert barrier.future.result(0) is None
    assert sent_when_resolved == [3]  # everything before it, nothing after it
    assert dispatcher.partial == 1


# ---------------------------------------------------------------------------- settling


async def test_acks_per_segment_sum_to_the_events_of_each_segment(
    make: Callable[..., Dispatcher],
) -> None:
    async def ok(context: Any) -> None:
        pass

    async def fails(context: Any) -> None:
        raise OSError("disk full")

    segments: dict[int, list[Any]] = {
        1: [*(metric("a", i) for i in range(1300)), tag("a", "t", "1"), tag("a", "t", "2")],
        2: [
            metric("a", 0, "bad"),
            param("a", "p", "1"),
            param("a", "p", "1"),
            Barrier(),
            Job("a", "artifact", "x.txt", ok),
            metric("b", 1),
        ],
        3: [tag("a", "bad", "v"), Job("a", "artifact", "y.txt", fails), end("a"), end("b")],
    }
    source = ListSource([c for s, events in segments.items() for c in chunks(s, events, 100)])
    ledger = Ledger()
    ledger.took(sum(counted(events) for events in segments.values()))
    await deliver(make(source, FakeTransport(), ledger, jobs=Context()))
    assert source.acked() == {s: counted(events) for s, events in segments.items()}
    assert ledger.held == 0
    assert (ledger.rejected, ledger.done) == (3, 3)  # bad metric, bad tag, y.txt; x.txt, 2 ends


async def test_settled_chunks_stop_before_the_oldest_unsettled_batch_or_request(
    make: Callable[..., Dispatcher],
) -> None:
    # chunks 0-3 fill one batch of run a (sent, held at the gate); chunk 4 starts b's batch
    a = [metric("a", i) for i in range(1000)]
    source = ListSource([*chunks(1, a, 250), (1, [metric("b", 0)]), (1, [metric("a", 1000)])])
    transport = FakeTransport(gated=True)
    dispatcher = make(source, transport)
    await dispatcher.pump(due=False)
    await transport.until_inside(1)
    assert source.settled_chunks and {c for c, _ in source.settled_chunks} == {0}
    transport.gate.set()
    await source.until_settled(1)
    # a's request is stored, but b's partial batch (from chunk 4) is not sent yet
    assert source.settled_chunks[-1] == (4, False)
    await deliver(dispatcher)
    assert source.settled_chunks[-1] == (6, False)


async def test_a_flush_marks_everything_before_it_before_it_resolves(
    make: Callable[..., Dispatcher],
) -> None:
    last, inside = Barrier(), Barrier()
    source = ListSource(
        [(1, [metric("a", 0), last]), (1, [metric("a", 1), inside, tag("a", "t", "v")])]
    )
    seen: list[list[tuple[int, bool]]] = []
    for barrier in (last, inside):
        barrier.future.add_done_callback(lambda _: seen.append(list(source.settled_chunks)))
    await deliver(make(source, FakeTransport()))
    # the barrier ending its chunk settles that chunk; one inside a chunk only those before
    assert seen[0][-1] == (1, True)
    assert seen[1][-1] == (1, True)
    assert source.settled_chunks[-1] == (2, False)


# ---------------------------------------------------------------------------- jobs


async def test_jobs_run_with_the_context_and_a_failing_one_is_refused_by_its_label(
    make: Callable[..., Dispatcher],
) -> None:
    context, seen = Context(), []

    async def upload(job_context: Any) -> None:
        seen.append(job_context)
        assert await job_context.run_blocking(lambda: "blocking") == "blocking"

    async def broken(job_context: Any) -> None:
        raise OSError("disk full")

    async def silent(job_context: Any) -> None:
        raise RuntimeError

    events = [
        Job("a", "artifact", "model.pkl", upload),
        Job("a", "artifact", "weights.bin", broken),
        Job("b", "model", "clf", silent),
    ]
    ledger, source = Ledger(), ListSource([(4, events)])
    ledger.took(3)
    await deliver(make(source, FakeTransport(), ledger, jobs=context))
    assert seen == [context]
    assert sorted(source.done) == [
        ("clf", 4, False),
        ("model.pkl", 4, True),
        ("weights.bin", 4, False),
    ]
    assert sorted(ledger.all_rejections(), key=str) == [
        Rejection("a", "artifact", "weights.bin", "disk full"),
        Rejection("b", "model", "clf", "RuntimeError()"),  # no message: named by its type
    ]
    assert (ledger.done, ledger.rejected, ledger.held) == (1, 2, 0)
    assert source.acked() == {4: 3}


async def test_a_job_without_a_context_is_refused(make: Callable[..., Dispatcher]) -> None:
    async def upload(job_context: Any) -> None:
        raise AssertionError("never run")

    ledger = Ledger()
    await deliver(
        make(ListSource([(1, [Job("a", "artifact", "f.txt", upload)])]), FakeTransport(), ledger)
    )
    (rejection,) = ledger.all_rejections()
    assert rejection == Rejection("a", "artifact", "f.txt", "no job context to run it in")


# ---------------------------------------------------------------------------- giving up


async def test_gave_up_surfaces_from_settle_and_stops_further_sends(
    make: Callable[..., Dispatcher],
) -> None:
    policy = RetryPolicy(first=0.001, maximum=0.002, patience=0.02)
    ledger, source, transport = Ledger(), ListSource(), FakeTransport(transient=10**9)
    dispatcher = make(source, transport, ledger, policy=policy)
    source.chunks.append((1, [metric("a", 0), tag("a", "t", "v")]))
    await dispatcher.pump(due=True)
    with pytest.raises(GaveUp, match="HTTP 503"):
        await dispatcher.settle()
    attempts = transport.attempts
    source.chunks.append((2, [metric("b", 0)]))
    with pytest.raises(GaveUp):
        await deliver(dispatcher)
    assert transport.attempts == attempts  # nothing more was sent
    assert source.acked() == {} and ledger.sent == 0  # what is unsettled stays on disk
    assert {chunks for chunks, _ in source.settled_chunks} == {0}  # nor is it marked


async def test_a_job_that_gave_up_stays_unsettled(make: Callable[..., Dispatcher]) -> None:
    async def upload(job_context: Any) -> None:
        raise GaveUp("S3 away")

    source = ListSource([(1, [Job("a", "artifact", "f.txt", upload)])])
    with pytest.raises(GaveUp, match="S3 away"):
        await deliver(make(source, FakeTransport(), jobs=Context()))
    assert source.done == [] and source.acked() == {}


# ---------------------------------------------------------------------------- slots


async def test_requests_in_flight_never_exceed_max_in_flight(
    make: Callable[..., Dispatcher],
) -> None:
    events = [metric(f"run{i}", 0) for i in range(6)]
    ledger, transport = Ledger(), FakeTransport(gated=True)
    dispatcher = make(ListSource([(1, events)]), transport, ledger, max_in_flight=2)
    pumping = asyncio.ensure_future(dispatcher.pump(due=True))
    await transport.until_inside(2)
    await let_run()
    assert (transport.inside, ledger.in_flight) == (2, 2)  # the other four wait for a slot
    transport.gate.set()
    await asyncio.wait_for(pumping, WAIT)
    await dispatcher.settle()
    assert transport.most_inside == 2
    assert len(transport.stored) == 6 and ledger.in_flight == 0
