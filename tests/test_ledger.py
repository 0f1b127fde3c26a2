"""Ledger: the counts of what happened to every event an engine (or a sync) took on."""

from __future__ import annotations

import logging
import threading

import pytest

from asynctrack._engine.ledger import Ledger
from asynctrack._engine.stats import Stats
from asynctrack.errors import Rejection


def rejection(run_id: str, key: str) -> Rejection:
    return Rejection(run_id, "metric", key, "INVALID_PARAMETER_VALUE: no")


def test_every_event_taken_is_held_until_it_is_settled() -> None:
    ledger = Ledger()
    ledger.took(10)
    ledger.stored(6)
    ledger.stored(1, request=False)  # folded into another request
    ledger.completed(1)  # a run's end
    ledger.refused([rejection("a", "x"), rejection("a", "y")])
    assert (ledger.held, ledger.sent, ledger.done, ledger.rejected) == (0, 7, 1, 2)
    assert ledger.batches == 1  # the folded event made no request


def test_retries_count_events_and_remember_why() -> None:
    ledger = Ledger()
    ledger.retrying(5, "HTTP 503")
    ledger.retrying(5, "ConnectionResetError")
    assert (ledger.retried, ledger.last_error) == (10, "ConnectionResetError")


def test_a_refusal_logs_its_reason_and_becomes_the_last_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = Ledger()
    with caplog.at_level(logging.WARNING, logger="asynctrack"):
        ledger.refused([rejection(f"r{i}", "loss") for i in range(8)])
        ledger.refused([rejection(f"s{i}", "loss") for i in range(8)])
    assert ledger.last_error == "INVALID_PARAMETER_VALUE: no"
    assert len(caplog.records) == 1  # once a reason: stderr never floods
    assert "run r0: metric 'loss': INVALID_PARAMETER_VALUE: no" in caplog.text
    assert ledger.refusal_lines() == [
        "16 refused (16 runs: metric 'loss', metric 'loss', metric 'loss' and 13 more): "
        "INVALID_PARAMETER_VALUE: no"
    ]


def test_rejections_are_taken_once_per_run_or_all_at_once() -> None:
    ledger = Ledger()
    ledger.refused([rejection("a", "x"), rejection("b", "y"), rejection("a", "z")])
    assert ledger.take_rejections("a") == [rejection("a", "x"), rejection("a", "z")]
    assert ledger.take_rejections("a") == []
    assert ledger.all_rejections() == [rejection("b", "y")]
    assert ledger.take_rejections() == [rejection("b", "y")]
    assert ledger.all_rejections() == []
    assert ledger.rejected == 3  # the count stays


def test_settled_events_are_reported_to_the_progress_callback() -> None:
    settled: list[int] = []
    ledger = Ledger(on_settled=settled.append)
    ledger.stored(3)
    ledger.stored(0, request=False)  # nothing folded: nothing to report
    ledger.completed(1)
    ledger.refused([rejection("a", "x")])
    assert settled == [3, 1, 1]


def test_drops_from_many_callers_are_all_counted() -> None:
    ledger = Ledger()

    def caller() -> None:
        for _ in range(1000):
            ledger.drop("full")

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.dropped == 4000 and ledger.dropped_reasons == {"full": 4000}


def test_stats_combine_the_counts_with_what_the_engine_knows() -> None:
    ledger = Ledger()
    ledger.took(5)
    ledger.stored(4)
    ledger.retrying(4, "HTTP 503")
    ledger.refused([rejection("a", "x")])
    ledger.drop("full")
    ledger.files.queued(2, 100)
    ledger.files.uploaded(60)
    stats = ledger.stats(queued=7, spooled=3, spool_bytes=300, durable=2)
    assert stats == Stats(
        queued=7, sent=4, retried=4, rejected=1, dropped=1, dropped_reasons={"full": 1},
        batches_sent=1, in_flight=0,
        files_queued=1, files_uploaded=1, bytes_queued=40, bytes_uploaded=60,
        spooled=3, spool_bytes=300, durable=2,
    )  # fmt: skip


class CountedRejection(Rejection):
    """A rejection that counts how often it is compared (the ledger's work)."""

    comparisons = 0
    __hash__ = Rejection.__hash__

    def __eq__(self, other: object) -> bool:
        CountedRejection.comparisons += 1
        return super().__eq__(other)


def test_taking_rejections_is_linear_in_their_number() -> None:
    ledger = Ledger()
    reason = "INVALID_PARAMETER_VALUE: The run r must be in the 'active' state."
    keys, steps = 100, 20  # per-layer metrics of a run deleted while it trained
    layers: list[Rejection] = [
        CountedRejection("r", "metric", f"layer{k}", reason) for k in range(keys)
    ]
    ledger.refused(layers * steps)
    ledger.refused([CountedRejection("other", "metric", "loss", reason)])
    CountedRejection.comparisons = 0
    assert len(ledger.take_rejections("r")) == keys * steps
    assert CountedRejection.comparisons <= 4 * keys * steps
