"""Bad input is refused at the call; server refusals and deadlines are reported at flush.

In every case the rest of what the run logged must still be stored, which the tests read
back from the real MLflow server.
"""

from __future__ import annotations

import math
import sys
import time
from fractions import Fraction
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

import asynctrack
from asynctrack import (
    DeliveryError,
    FlushTimeoutError,
    MLflowExperimentTracker,
    Rejection,
)
from asynctrack._engine.engine import Engine
from asynctrack.config import EngineConfig
from asynctrack.testing import MlflowServer


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


# ---------------------------------------------------------------------------- metric values

BAD_VALUES = [
    pytest.param("one", id="str"),
    pytest.param(None, id="None"),
    pytest.param([1.0], id="list"),
    pytest.param(1 + 2j, id="complex"),
    pytest.param(np.array([1.0, 2.0]), id="two-element-array"),
]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_metric_value_raises_mlflow_error_and_loses_nothing(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker, value: object
) -> None:
    with tracker.start_run():
        tracker.log_metric("good", 1.0, step=0)
        with pytest.raises(MlflowException, match=r"metric 'bad'") as info:
            tracker.log_metric("bad", value)
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
        # log_metrics names the bad entry and still logs the good ones.
        with pytest.raises(ValueError, match="'bad2'"):
            tracker.log_metrics({"good": 2.0, "bad2": value, "also_good": 3.0}, step=1)  # type: ignore[dict-item]
        tracker.log_param("p", "kept")
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert history(client, run_id, "good") == [(0, 1.0), (1, 2.0)]
    assert history(client, run_id, "also_good") == [(1, 3.0)]
    assert set(run.data.metrics) == {"good", "also_good"}
    assert run.data.params == {"p": "kept"}


@pytest.mark.parametrize("step", [1.5, "3", True, np.float64(2.0), 2**63, -(2**63) - 1])
def test_bad_step_raises_at_the_call(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker, step: object
) -> None:
    with tracker.start_run():
        # a TypeError for a type, an out-of-range error for int64 overflow: both ValueErrors
        with pytest.raises(ValueError, match="step"):
            tracker.log_metric("m", 1.0, step=step)
        with pytest.raises(ValueError, match="step"):
            tracker.log_metrics({"m": 1.0}, step=step)
        tracker.log_metric("m", 2.0, step=np.int64(5))
        run_id = tracker.run_id
    assert history(client, run_id, "m") == [(5, 2.0)]


def test_numeric_types_nan_and_infinity_are_stored(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        tracker.log_metric("np_float32", np.float32(0.5))
        tracker.log_metric("np_float64", np.float64(0.25))
        tracker.log_metric("np_int64", np.int64(7))
        tracker.log_metric("fraction", Fraction(1, 4))
        tracker.log_metric("big_int", 2**40)
        tracker.log_metric("nan", float("nan"))
        tracker.log_metric("pos_inf", math.inf)
        tracker.log_metric("neg_inf", -math.inf)
        tracker.log_metrics({"np_nan": np.float64("nan"), "zero": 0}, step=2)
        run_id = tracker.run_id
    metrics = client.get_run(run_id).data.metrics
    assert metrics["np_float32"] == 0.5
    assert metrics["np_float64"] == 0.25
    assert metrics["np_int64"] == 7.0
    assert metrics["fraction"] == 0.25
    assert metrics["big_int"] == float(2**40)
    assert math.isnan(metrics["nan"])
    assert math.isnan(metrics["np_nan"])
    assert metrics["pos_inf"] == sys.float_info.max
    assert metrics["neg_inf"] == -sys.float_info.max
    assert history(client, run_id, "zero") == [(2, 0.0)]


# ---------------------------------------------------------------------------- keys

BAD_KEYS = [
    pytest.param("bad key!", id="invalid-char"),
    pytest.param("semi;colon", id="semicolon"),
    pytest.param("../x", id="dotdot"),
    pytest.param("/abs", id="absolute"),
    pytest.param("a//b", id="double-slash"),
    pytest.param("", id="empty"),
    pytest.param("k" * 251, id="251-chars"),
    pytest.param(123, id="int"),
    pytest.param(None, id="None"),
    pytest.param(("a",), id="tuple"),
    pytest.param(["a"], id="list"),
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_key_raises_value_error_and_loses_nothing(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker, key: object
) -> None:
    with tracker.start_run():
        tracker.log_metric("good", 1.0)
        with pytest.raises(ValueError, match="metric key"):
            tracker.log_metric(key, 1.0)
        with pytest.raises(ValueError, match="param key"):
            tracker.log_param(key, 1)
        with pytest.raises(ValueError, match="tag key"):
            tracker.set_tag(key, "x")
        if isinstance(key, list):  # cannot be a dict key: the mapping calls cannot see it
            tracker.log_metrics({"good2": 2.0})
            tracker.log_params({"p": 2})
            tracker.set_tags({"t": "v"})
        else:
            with pytest.raises(ValueError, match="metric key"):
                tracker.log_metrics({key: 1.0, "good2": 2.0})  # type: ignore[dict-item]
            with pytest.raises(ValueError, match="param key"):
                tracker.log_params({key: 1, "p": 2})  # type: ignore[dict-item]
            with pytest.raises(ValueError, match="tag key"):
                tracker.set_tags({key: 1, "t": "v"})  # type: ignore[dict-item]
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"good": 1.0, "good2": 2.0}
    assert run.data.params == {"p": "2"}
    assert run.data.tags["t"] == "v"


def test_key_error_messages_name_the_key(tracker: MLflowExperimentTracker) -> None:
    with tracker.start_run():
        # MLflow's own words first, then which key
        with pytest.raises(ValueError, match=r"^Invalid value \"bad key!\" .*metric key 'bad"):
            tracker.log_metric("bad key!", 1.0)
        with pytest.raises(ValueError, match=r"This name would resolve to '\.\./x'"):
            tracker.log_metric("../x", 1.0)
        with pytest.raises(ValueError, match=r"^'Param key' exceeds the maximum length of 250"):
            tracker.log_param("k" * 251, 1)
        with pytest.raises(ValueError, match=r"must be a string\..*tag key of type int"):
            tracker.set_tag(5, "x")


def test_longest_allowed_key_and_odd_valid_keys_are_stored(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    longest = "k" * 250
    odd = "train/loss: epoch-1.mean_x"
    with tracker.start_run():
        tracker.log_metric(longest, 1.0)
        tracker.log_metric(odd, 2.0)
        tracker.log_param(longest, "v")
        tracker.set_tag(odd, "t")
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.data.metrics == {longest: 1.0, odd: 2.0}
    assert run.data.params == {longest: "v"}
    assert run.data.tags[odd] == "t"


def test_bad_tag_key_in_start_run_creates_no_run(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker, experiment_name: str
) -> None:
    with pytest.raises(ValueError, match="tag key"), tracker.start_run(tags={"bad key!": 1}):
        pytest.fail("the run must not start")
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        assert client.search_runs([experiment.experiment_id]) == []


# ---------------------------------------------------------------------------- long values


def test_long_param_and_tag_values_are_truncated_with_a_warning(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        with pytest.warns(UserWarning, match="6000") as param_warning:
            tracker.log_param("long_param", "p" * 7000)
        with pytest.warns(UserWarning, match="8000"):
            tracker.set_tag("long_tag", "t" * 9000)
        with pytest.warns(UserWarning, match="truncated"):
            tracker.log_params({"long_param2": "q" * 6001, "short": "s"})
        tracker.log_param("exact", "e" * 6000)
        tracker.log_metric("m", 1.0)
        run_id = tracker.run_id
    assert len(param_warning) == 1
    run = client.get_run(run_id)
    assert run.data.params == {
        "long_param": "p" * 6000,
        "long_param2": "q" * 6000,
        "short": "s",
        "exact": "e" * 6000,
    }
    assert run.data.tags["long_tag"] == "t" * 8000
    assert run.data.metrics == {"m": 1.0}


def test_truncation_warning_points_at_the_caller(tracker: MLflowExperimentTracker) -> None:
    with tracker.start_run():
        with pytest.warns(UserWarning) as record:
            tracker.log_param("long_param", "p" * 7000)
        with pytest.warns(UserWarning) as tag_record:
            tracker.set_tag("long_tag", "t" * 9000)
    assert record[0].filename == __file__
    assert tag_record[0].filename == __file__


def test_long_values_raise_when_truncation_is_off(
    client: mlflow.MlflowClient,
    tracker: MLflowExperimentTracker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
    with tracker.start_run():
        with pytest.raises(ValueError, match="maximum length of 6000 characters"):
            tracker.log_param("long_param", "p" * 6001)
        tracker.log_param("ok", "fine")
        run_id = tracker.run_id
    assert client.get_run(run_id).data.params == {"ok": "fine"}


# ---------------------------------------------------------------------------- server refusals


def _log_around_conflict(tracker: MLflowExperimentTracker, client: mlflow.MlflowClient) -> str:
    """Another client stores lr=B first, so only the server can see asynctrack's lr=A clash."""
    run_id = tracker.run_id
    assert run_id is not None
    client.log_param(run_id, "lr", "B")
    tracker.log_params({"batch_size": 32, "lr": "A", "epochs": 3})
    tracker.set_tag("stage", "train")
    for i in range(300):
        tracker.log_metric("loss", i / 10, step=i)
    return run_id


def _check_survivors(client: mlflow.MlflowClient, run_id: str) -> None:
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "B", "batch_size": "32", "epochs": "3"}
    assert run.data.tags["stage"] == "train"
    assert history(client, run_id, "loss") == [(i, i / 10) for i in range(300)]


def _check_conflict(error: DeliveryError, run_id: str) -> None:
    assert isinstance(error, asynctrack.AsyncTrackError)
    assert len(error.rejections) == 1
    rejection = error.rejections[0]
    assert isinstance(rejection, Rejection)
    assert (rejection.run_id, rejection.kind, rejection.key) == (run_id, "param", "lr")
    assert "Changing param values is not allowed" in rejection.reason
    message = str(error)
    assert run_id in message
    assert "'lr'" in message
    assert "Changing param values" in message


def test_server_param_conflict_reported_at_flush(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        run_id = _log_around_conflict(tracker, client)
        before = tracker.stats()
        with pytest.raises(DeliveryError) as info:
            tracker.flush()
        _check_conflict(info.value, run_id)
        assert tracker.stats().rejected - before.rejected == 1
        # Reported once: the next flush is clean.
        tracker.log_metric("after", 1.0)
        tracker.flush()
    _check_survivors(client, run_id)
    assert history(client, run_id, "after") == [(0, 1.0)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_server_param_conflict_reported_at_run_end(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with pytest.raises(DeliveryError) as info, tracker.start_run():
        run_id = _log_around_conflict(tracker, client)
    _check_conflict(info.value, run_id)
    _check_survivors(client, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_refusal_during_a_failing_run_does_not_mask_the_exception(
    client: mlflow.MlflowClient,
    tracker: MLflowExperimentTracker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = RuntimeError("training crashed")
    with (
        caplog.at_level("WARNING", logger="asynctrack"),
        pytest.raises(RuntimeError) as info,
        tracker.start_run(),
    ):
        run_id = _log_around_conflict(tracker, client)
        raise error
    assert info.value is error
    _check_survivors(client, run_id)
    assert client.get_run(run_id).info.status == "FAILED"
    assert "Changing param values" in caplog.text
    assert "'lr'" in caplog.text


def test_long_non_ascii_keys_fill_a_batch_and_still_land(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    """1000 metrics with 250-character Cyrillic keys escape to a body over 1 MB."""
    keys = [f"{i:03d}" + "ж" * 247 for i in range(4)]
    with tracker.start_run():
        for step in range(250):
            for key in keys:
                tracker.log_metric(key, float(step), step=step)
        before = tracker.stats()
        tracker.flush()
        assert tracker.stats().rejected == before.rejected
        run_id = tracker.run_id
    for key in keys:
        assert history(client, run_id, key) == [(s, float(s)) for s in range(250)]


def test_deleted_run_is_reported_and_other_runs_are_stored(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    doomed = MLflowExperimentTracker(experiment_name=experiment_name)
    kept = MLflowExperimentTracker(experiment_name=experiment_name)
    with kept.start_run():
        with pytest.raises(DeliveryError) as info, doomed.start_run():
            doomed_id = doomed.run_id
            assert doomed_id is not None
            client.delete_run(doomed_id)
            for i in range(20):
                doomed.log_metric("doomed_metric", float(i), step=i)
                kept.log_metric("kept_metric", float(i), step=i)
            doomed.log_param("doomed_param", 1)
            doomed.set_tag("doomed_tag", "x")
            kept.log_param("kept_param", 2)
            kept.set_tag("kept_tag", "y")
            asynctrack.flush()
        kept.log_metric("kept_metric", 20.0, step=20)
        kept_id = kept.run_id

    rejections = info.value.rejections
    assert {r.run_id for r in rejections} == {doomed_id}
    assert sorted((r.kind, r.key) for r in rejections) == sorted(
        [("metric", "doomed_metric")] * 20 + [("param", "doomed_param"), ("tag", "doomed_tag")]
    )
    assert all("active" in r.reason for r in rejections)
    kept_run = client.get_run(kept_id)
    assert kept_run.info.status == "FINISHED"
    assert history(client, kept_id, "kept_metric") == [(i, float(i)) for i in range(21)]
    assert kept_run.data.params == {"kept_param": "2"}
    assert kept_run.data.tags["kept_tag"] == "y"


def test_deleted_run_with_many_events_is_reported_promptly(
    client: mlflow.MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    experiment_id = client.create_experiment(experiment_name)
    doomed = client.create_run(experiment_id).info.run_id
    kept = client.create_run(experiment_id).info.run_id
    client.delete_run(doomed)
    # An engine of its own, so whatever it still holds afterwards is dropped with it.
    engine = Engine(mlflow_server.url, EngineConfig.resolve(flush_interval=1000.0))
    try:
        now = time.time()
        for i in range(1000):
            engine.put((doomed, "m", float(i), now, i))
        for i in range(10):
            engine.put((kept, "m", float(i), now, i))
        with pytest.raises(DeliveryError) as info:
            engine.flush(timeout=8)
    finally:
        engine.close(0.5)
    assert len(info.value.rejections) == 1000
    assert {r.run_id for r in info.value.rejections} == {doomed}
    assert history(client, kept, "m") == [(i, float(i)) for i in range(10)]


# ---------------------------------------------------------------------------- deadlines


@pytest.mark.timeout(180)
def test_flush_timeout_with_server_down_then_everything_arrives(
    tmp_path: Path, experiment_name: str
) -> None:
    with MlflowServer(tmp_path) as server:
        tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=server.url)
        with tracker.start_run():
            run_id = tracker.run_id
            assert run_id is not None
            tracker.log_metric("m", 0.0, step=0)
            tracker.flush()
            server.stop()
            for i in range(1, 51):
                tracker.log_metric("m", float(i), step=i)
            tracker.log_param("p", "while-down")
            with pytest.raises(FlushTimeoutError) as info:
                tracker.flush(timeout=1)
            assert isinstance(info.value, TimeoutError)
            assert info.value.pending >= 51
            assert "not yet stored" in str(info.value)
            with pytest.raises(TimeoutError):
                asynctrack.flush(timeout=0.5)
            server.start()
            tracker.flush()
        stored = mlflow.MlflowClient(tracking_uri=server.url)
        run = stored.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"p": "while-down"}
        assert history(stored, run_id, "m") == [(i, float(i)) for i in range(51)]
        assert tracker.stats().queued == 0
