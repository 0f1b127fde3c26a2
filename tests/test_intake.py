"""Intake: from the callers' queue through a real spool (in ``tmp_path``) to the window the
dispatcher reads with ``next_chunk`` and settles with ``ack``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asynctrack._engine import spool, status
from asynctrack._engine.events import Barrier, MetaEvent, Metric
from asynctrack._engine.intake import CHUNK, Intake
from asynctrack._engine.queue import EventQueue
from asynctrack.config import EngineConfig
from asynctrack.errors import Rejection


def make_queue() -> EventQueue:
    queue = EventQueue(
        EngineConfig(), lambda: None, lambda: None, lambda reason: None, lambda: "full"
    )
    queue.open = True  # as if the worker ran
    return queue


@pytest.fixture
def spool_root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_intake(spool_root: Path) -> Iterator[Any]:
    """``make_intake(window, segment_bytes=...)``: an Intake over a fresh queue and spool."""
    made: list[Intake] = []

    def build(window: int = 10_000, segment_bytes: int = 1 << 20, spooled: bool = True) -> Intake:
        writer = spool.Writer(spool_root, "http://tracking", segment_bytes, 1 << 30)
        intake = Intake(make_queue(), writer if spooled else None, window)
        if not spooled:
            writer.close(empty=True)
        made.append(intake)
        return intake

    yield build
    for intake in made:
        intake.close()


def metric(step: int, value: Any = None) -> Metric:
    return ("r", "loss", float(step) if value is None else value, 1.5, step)


def put_all(intake: Intake, events: list[Any]) -> None:
    for event in events:
        intake.queue.put(event)


def drain(intake: Intake) -> list[tuple[int, list[Any]]]:
    chunks = []
    while (chunk := intake.next_chunk()) is not None:
        chunks.append(chunk)
    return chunks


def spooled_events(writer: spool.Writer, segment: int) -> list[Any]:
    read = spool.read_segment(writer.path(segment))
    assert read.damage == ""
    return [event for _, events in read.records for event in events]


def test_pull_spools_each_chunk_and_keeps_it_for_sending(make_intake: Any) -> None:
    intake = make_intake()
    events = [metric(i) for i in range(600)]
    put_all(intake, events)
    assert intake.pull() == 600
    assert len(intake.queue) == 0
    assert spooled_events(intake.writer, 1) == events
    assert (intake.spooled, intake.outstanding, intake.waiting) == (600, {1: 600}, 600)
    assert [(s, len(c)) for s, c in drain(intake)] == [(1, CHUNK), (1, CHUNK), (1, 88)]


def test_next_chunk_keeps_queueing_order_across_kinds(make_intake: Any) -> None:
    intake = make_intake()
    barrier = Barrier()
    events = [metric(0), MetaEvent("tag", "r", "t", "v"), barrier, metric(1)]
    put_all(intake, events)
    assert intake.pull() == 3  # the barrier is not an event
    assert drain(intake) == [(1, events)]
    assert intake.next_chunk() is None
    (tag,) = [e for e in spooled_events(intake.writer, 1) if isinstance(e, MetaEvent)]
    assert (tag.kind, tag.key, tag.value) == ("tag", "t", "v")


def test_ack_drops_a_sealed_segment_once_all_its_events_are_settled(make_intake: Any) -> None:
    intake = make_intake(segment_bytes=100)  # every chunk fills a segment
    put_all(intake, [metric(i) for i in range(3 * CHUNK)])
    intake.pull()
    writer = intake.writer
    assert writer.segment == 3 and intake.outstanding == {1: CHUNK, 2: CHUNK, 3: CHUNK}
    intake.ack(1, CHUNK - 1)
    assert writer.path(1).exists()  # one event still unsettled
    intake.ack(1, 1)
    assert not writer.path(1).exists()
    intake.ack(3, CHUNK)
    assert writer.path(3).exists()  # still being written
    assert intake.waiting == CHUNK


def test_a_window_overflow_goes_to_disk_and_is_read_back_in_order(make_intake: Any) -> None:
    intake = make_intake(window=300)
    before, after = [metric(i) for i in range(700)], [metric(i) for i in range(700, 1000)]
    barrier = Barrier()
    put_all(intake, [*before, barrier, *after])
    assert intake.pull() == 1000  # taking never waits for the window
    assert intake.mem_events <= 300 + CHUNK and intake.backlog is not None
    out = [event for _, chunk in drain(intake) for event in chunk]
    assert [e for e in out if e is not barrier] == before + after
    assert out.index(barrier) >= len(before)  # after everything queued before it
    assert intake.backlog is None


def test_settled_records_are_marked_and_status_counts_only_the_rest(make_intake: Any) -> None:
    intake = make_intake()
    put_all(intake, [metric(i) for i in range(600)])  # records of 256, 256 and 88 events
    intake.pull()
    writer = intake.writer
    assert status.survey([writer.path(1)], writing=True).events == 600
    assert len(drain(intake)) == 3
    intake.settled(2, now=True)
    seen = status.survey([writer.path(1)], writing=True)
    assert seen.events == 88
    starts = [start for start, _ in spool.read_segment(writer.path(1)).spans()]
    assert seen.settled == {(1, starts[0]), (1, starts[1])}
    intake.settled(3, now=False)  # within MARK_INTERVAL of the last marker, or not: either
    intake.close()  # way, at the latest on closing
    assert status.survey([writer.path(1)]).events == 0


def test_a_backlog_read_back_skips_markers_and_its_records_are_marked(make_intake: Any) -> None:
    intake = make_intake(window=300)
    events = [metric(i) for i in range(1000)]  # records of 256, 256, 256, 232
    put_all(intake, events)
    intake.pull()
    assert intake.backlog is not None  # the last two records are on disk only
    first = [intake.next_chunk(), intake.next_chunk()]
    intake.settled(2, now=True)  # a marker after the backlog's records, in the same segment
    rest = drain(intake)
    assert [e for _, c in first + rest for e in c] == events  # the marker is not an event
    assert intake.backlog is None
    path = intake.writer.path(1)
    assert status.survey([path], writing=True).events == 1000 - 2 * CHUNK
    intake.settled(4, now=True)
    assert status.survey([path], writing=True).events == 0


def test_without_a_spool_intake_stops_at_the_window(make_intake: Any) -> None:
    intake = make_intake(window=300, spooled=False)
    put_all(intake, [metric(i) for i in range(1000)])
    assert intake.pull() == 2 * CHUNK
    assert len(intake.queue) == 1000 - 2 * CHUNK  # callers meet the queue's capacity
    assert [s for s, _ in drain(intake)] == [0, 0]
    assert intake.pull() == 1000 - 2 * CHUNK  # room again: the rest comes in


class Scalar:
    """A one-element tensor's stand-in: only ``float()`` reads it."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value


class Broken:
    def __float__(self) -> float:
        raise RuntimeError("device lost")


def test_a_value_marshal_cannot_write_is_converted_before_spooling(make_intake: Any) -> None:
    intake = make_intake()
    put_all(intake, [metric(0), metric(1, Scalar(0.5)), metric(2)])
    assert intake.pull() == 3
    expected = [metric(0), metric(1, 0.5), metric(2)]
    assert spooled_events(intake.writer, 1) == expected
    assert drain(intake) == [(1, expected)]
    assert intake.refused == []


def test_a_value_that_cannot_be_converted_is_refused_alone(make_intake: Any) -> None:
    intake = make_intake()
    put_all(intake, [metric(0), ("r", "odd", Broken(), 1.5, 1), metric(2)])
    assert intake.pull() == 2
    assert spooled_events(intake.writer, 1) == [metric(0), metric(2)]
    assert drain(intake) == [(1, [metric(0), metric(2)])]
    reason = "cannot convert the value to a double: RuntimeError: device lost"
    assert intake.refused == [Rejection("r", "metric", "odd", reason)]
    assert intake.outstanding == {1: 2}
