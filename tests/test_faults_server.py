"""Faults between asynctrack and a real MLflow server: nothing lost, nothing stored twice.

The server is killed and restarted, or a fault-injecting proxy (``tests/faults.py``) in
front of it answers 500 and 429, answers late, or drops connections. Each test logs while
the fault is on, waits until the proxy (or the engine's retry counter) has seen the fault
act a few times, lifts it, and then reads everything back from the server directly, not
through the proxy: every param and tag, and every metric step exactly once.
"""

from __future__ import annotations

import http.client
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from faults import DropStage, FaultProxy, wait_until

import asynctrack
from asynctrack import MLflowExperimentTracker
from asynctrack._engine import get_engine
from asynctrack.testing import MlflowServer

# Only batches meet the faults: creating the run and reading back go through untouched.
LOG_BATCH = "log-batch"
# How many times a fault must have acted before it is lifted: a few backoff rounds
# (0.25 s, 0.5 s, 1 s...), short of the 8 s ceiling.
ROUNDS = 3
# Requests a proxy fault must have failed before it is lifted: with at most 4 batches in
# flight (max_in_flight), that is at least two attempts of some batch.
FAILURES = 8

Tracking = Callable[..., MLflowExperimentTracker]


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def log_phase(tracker: MLflowExperimentTracker, steps: range, phase: str) -> None:
    """Two metrics per step, a param and a tag named after the phase."""
    for step in steps:
        tracker.log_metric("loss", 1.0 / (step + 1), step=step)
        tracker.log_metric("acc", step / 10_000, step=step)
    tracker.log_param(f"param_{phase}", phase)
    tracker.set_tag(f"tag_{phase}", phase)


def check_stored(client: mlflow.MlflowClient, run_id: str, steps: int, phases: list[str]) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {f"param_{p}": p for p in phases}
    assert {k: v for k, v in run.data.tags.items() if k.startswith("tag_")} == {
        f"tag_{p}": p for p in phases
    }
    # Sorted, so a step stored twice shows up as a repeated entry.
    assert history(client, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(steps)]
    assert history(client, run_id, "acc") == [(s, s / 10_000) for s in range(steps)]


@pytest.fixture
def tracking(experiment_name: str) -> Iterator[Tracking]:
    """``tracking(uri, **engine_settings)``: a tracker with an engine of its own for ``uri``
    (settled and closed at the end, so nothing it holds reaches a later test)."""
    uris: list[str] = []

    def make(uri: str, **settings: float) -> MLflowExperimentTracker:
        asynctrack.configure_engine(uri, **{"flush_interval": 0.2, **settings})
        uris.append(uri)
        return MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=uri)

    yield make
    for uri in uris:
        left = get_engine(uri).close(10)
        assert left == 0, f"{left} event(s) still queued for {uri}"


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    """A fresh proxy (so a fresh tracking URI, so a fresh engine) to the session server."""
    with FaultProxy(mlflow_server.url) as proxy:
        yield proxy


# ---------------------------------------------------------------------------- the proxy


def test_proxy_injects_what_it_is_told(proxy: FaultProxy) -> None:
    """The tool itself, on one kept-alive connection where the faults leave it open."""
    port = int(proxy.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def get(path: str = "/health") -> tuple[int, str | None]:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Retry-After")

    try:
        assert get() == (200, None)
        proxy.fail(429, count=2, retry_after=1, path="health")
        assert [get(), get(), get()] == [(429, "1"), (429, "1"), (200, None)]
        proxy.fail(503, path=LOG_BATCH)  # other paths pass
        assert get() == (200, None)
        proxy.delay(0.1, count=1)
        assert get() == (200, None)
        proxy.drop("after_request", count=1)
        with pytest.raises(http.client.RemoteDisconnected):
            get()
        conn.close()
        assert get() == (200, None)  # a new connection; the drop was used up
    finally:
        conn.close()
    assert proxy.mode == "pass-through"  # the last fault (a drop) was used up
    assert proxy.counts() == {
        "seen": 8,
        "forwarded": 5,
        "failed": 3,
        "delayed": 1,
        "dropped": 1,
        "upstream_errors": 0,
    }
    assert proxy.statuses == {429: 2}
    assert [r.outcome for r in proxy.records] == [
        "forwarded",
        "failed 429",
        "failed 429",
        "forwarded",
        "forwarded",
        "delayed 0.1 s after",
        "dropped after_request",
        "forwarded",
    ]


# ---------------------------------------------------------------------------- server killed


@pytest.mark.timeout(180)
def test_server_killed_and_restarted_loses_nothing(tmp_path: Path, tracking: Tracking) -> None:
    with MlflowServer(tmp_path / "server") as server:
        tracker = tracking(server.url, request_timeout=5.0)
        with tracker.start_run():
            run_id = tracker.run_id
            assert run_id is not None
            log_phase(tracker, range(0, 500), "before")
            tracker.flush(30)
            # Not flushed: these may be queued, in flight or stored when the server dies.
            log_phase(tracker, range(500, 1000), "at_kill")
            assert server.pid is not None
            os.killpg(server.pid, signal.SIGKILL)
            server.stop()  # reaps what the SIGKILL left

            log_phase(tracker, range(1000, 1500), "while_down")
            retried = tracker.stats().retried
            pending = tracker.stats().queued
            assert pending > 0
            # Every event still held has been tried ROUNDS more times, on average.
            wait_until(
                lambda: tracker.stats().retried - retried >= ROUNDS * pending,
                timeout=60,
                what=f"{ROUNDS} retries of {pending} events with the server down",
            )
            assert tracker.stats().queued > 0

            server.start()  # same port, same store
            log_phase(tracker, range(1500, 1600), "after")
            tracker.flush(60)
        stored = mlflow.MlflowClient(tracking_uri=server.url)
        check_stored(stored, run_id, 1600, ["before", "at_kill", "while_down", "after"])
        assert tracker.stats().rejected == 0


# ---------------------------------------------------------------------------- proxy faults


@pytest.mark.timeout(120)
def test_500_then_429_then_normal_loses_nothing(
    client: mlflow.MlflowClient, proxy: FaultProxy, tracking: Tracking
) -> None:
    tracker = tracking(proxy.url)
    with tracker.start_run():
        run_id = tracker.run_id
        assert run_id is not None
        log_phase(tracker, range(0, 100), "before")
        tracker.flush(30)

        proxy.fail(500, path=LOG_BATCH)
        # Thousands of calls while every batch fails: each returns, the loop completes.
        log_phase(tracker, range(100, 3100), "during_500")
        proxy.wait_for(lambda: proxy.statuses[500] >= FAILURES)

        proxy.fail(429, path=LOG_BATCH, retry_after=1)
        log_phase(tracker, range(3100, 4100), "during_429")
        proxy.wait_for(lambda: proxy.statuses[429] >= FAILURES)

        proxy.pass_through()
        log_phase(tracker, range(4100, 4200), "after")
        tracker.flush(60)
        assert tracker.stats().retried > 0
        assert tracker.stats().rejected == 0
    check_stored(client, run_id, 4200, ["before", "during_500", "during_429", "after"])
    assert proxy.count(LOG_BATCH, "failed 500") >= FAILURES
    assert proxy.count(LOG_BATCH, "failed 429") >= FAILURES


@pytest.mark.timeout(120)
def test_answers_slower_than_request_timeout_store_everything_once(
    client: mlflow.MlflowClient, proxy: FaultProxy, tracking: Tracking
) -> None:
    tracker = tracking(proxy.url, request_timeout=1.0)
    with tracker.start_run():
        run_id = tracker.run_id
        assert run_id is not None
        log_phase(tracker, range(0, 100), "before")
        tracker.flush(30)

        # The server stores each batch; its answer comes after the client gave up, so the
        # client sends it again (and again): MLflow must keep one copy.
        proxy.delay(2.0, path=LOG_BATCH)
        log_phase(tracker, range(100, 600), "slow")
        proxy.wait_for(lambda: proxy.delayed >= ROUNDS and tracker.stats().retried > 0)

        proxy.pass_through()
        log_phase(tracker, range(600, 700), "after")
        tracker.flush(60)
        assert tracker.stats().rejected == 0
    check_stored(client, run_id, 700, ["before", "slow", "after"])
    assert proxy.count(LOG_BATCH, "delayed") >= ROUNDS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", ["mid_request", "after_request", "after_forward"])
def test_dropped_connections_store_everything_once(
    client: mlflow.MlflowClient, proxy: FaultProxy, tracking: Tracking, stage: DropStage
) -> None:
    tracker = tracking(proxy.url)
    with tracker.start_run():
        run_id = tracker.run_id
        assert run_id is not None
        log_phase(tracker, range(0, 100), "before")
        tracker.flush(30)

        proxy.drop(stage, path=LOG_BATCH)
        log_phase(tracker, range(100, 2100), "dropping")
        proxy.wait_for(lambda: proxy.dropped >= FAILURES)

        proxy.pass_through()
        log_phase(tracker, range(2100, 2200), "after")
        tracker.flush(60)
        assert tracker.stats().retried > 0
        assert tracker.stats().rejected == 0
    check_stored(client, run_id, 2200, ["before", "dropping", "after"])
    assert proxy.count(LOG_BATCH, f"dropped {stage}") >= FAILURES


@pytest.mark.timeout(60)
def test_tag_resent_after_a_timeout_is_not_overwritten_by_the_late_original(
    client: mlflow.MlflowClient, proxy: FaultProxy, tracking: Tracking
) -> None:
    tracker = tracking(proxy.url, request_timeout=1.0)
    with tracker.start_run():
        run_id = tracker.run_id
        assert run_id is not None
        # The first request carrying stage=old waits in the proxy; the client gives up on
        # it after 1 s and sends it again, and that copy goes through.
        proxy.hold(count=1, path=LOG_BATCH)
        tracker.set_tag("stage", "old")
        proxy.wait_for(lambda: proxy.delayed == 1 and tracker.stats().retried >= 1)
        tracker.flush(30)
        tracker.set_tag("stage", "new")
        tracker.flush(30)
        assert client.get_run(run_id).data.tags["stage"] == "new"
        # Now the original reaches the server, as a request queued in a slow server or a
        # load balancer would.
        forwarded = proxy.forwarded
        proxy.release()
        proxy.wait_for(lambda: proxy.forwarded == forwarded + 1)
        assert client.get_run(run_id).data.tags["stage"] == "old"  # the late copy landed
    # Before ending the run, the engine read its tags back and set "stage" again.
    assert client.get_run(run_id).data.tags["stage"] == "new"  # the last set_tag wins
