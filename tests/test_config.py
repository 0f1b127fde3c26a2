"""Configuration: the seed's MLflow/S3 settings (``asynctrack.config``), ``setup_mlflow_env``
and the engine's knobs (``EngineConfig.resolve``: keyword, then ``ASYNCTRACK_*``, then
default; invalid values raise ``ConfigError``, a ``ValueError``)."""

from __future__ import annotations

import importlib
import math
import os
import uuid
from collections.abc import Iterator
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

import asynctrack
from asynctrack import ConfigError, MLflowExperimentTracker, config
from asynctrack.config import EngineConfig
from asynctrack.testing import MlflowServer

SEED_DEFAULTS = {
    "MLFLOW_TRACKING_URI": "http://localhost:5000",
    "MLFLOW_EXPERIMENT_NAME": "boston-housing",
    "MLFLOW_S3_ENDPOINT_URL": "http://localhost:9000",
    "AWS_ACCESS_KEY_ID": "minioadmin0",
    "AWS_SECRET_ACCESS_KEY": "minioadmin1230",
}
S3_VARS = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(autouse=True)
def _restore_config_module() -> Iterator[None]:
    """Tests reload asynctrack.config; put back the very objects other modules hold."""
    snapshot = dict(vars(config))
    yield
    namespace = vars(config)
    namespace.clear()
    namespace.update(snapshot)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No seed or ASYNCTRACK_* variables in the environment (restored after the test)."""
    for name in SEED_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("ASYNCTRACK_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def restore_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup_mlflow_env() sets MLflow's global tracking URI (and the variable): undo it."""
    saved, saved_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(saved)  # None restores "unset"
    if saved_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved_env


# ---------------------------------------------------------------------- seed settings


def test_seed_defaults_when_environment_is_empty(clean_env: pytest.MonkeyPatch) -> None:
    importlib.reload(config)
    for name, default in SEED_DEFAULTS.items():
        assert getattr(config, name) == default, name
    assert asynctrack.config is config


def test_seed_settings_read_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    values = {name: f"value-of-{name.lower()}" for name in SEED_DEFAULTS}
    values["MLFLOW_TRACKING_URI"] = "http://mlflow.internal:5000"
    for name, value in values.items():
        clean_env.setenv(name, value)
    importlib.reload(config)
    for name, value in values.items():
        assert getattr(config, name) == value, name


def test_setup_mlflow_env_exports_s3_and_points_mlflow_at_server(
    clean_env: pytest.MonkeyPatch,
    restore_tracking_uri: None,
    mlflow_server: MlflowServer,
    experiment_name: str,
) -> None:
    clean_env.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    clean_env.setenv("AWS_ACCESS_KEY_ID", "from-config")
    importlib.reload(config)
    # Only setup_mlflow_env() may now point MLflow at the server.
    clean_env.delenv("MLFLOW_TRACKING_URI")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "already-set")  # kept: present values win
    assert mlflow.get_tracking_uri() != mlflow_server.url

    asynctrack.setup_mlflow_env()

    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == SEED_DEFAULTS["MLFLOW_S3_ENDPOINT_URL"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SEED_DEFAULTS["AWS_SECRET_ACCESS_KEY"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == "already-set"
    assert mlflow.get_tracking_uri() == mlflow_server.url

    # A tracker with no tracking_uri now logs to that server.
    with MLflowExperimentTracker(experiment_name=experiment_name) as tracker:
        tracker.log_metric("m", 1.5)
        run_id = tracker.run_id
    assert run_id is not None
    run = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id)
    assert run.data.metrics == {"m": 1.5}
    assert run.info.status == "FINISHED"


def test_experiment_name_default_comes_from_environment(
    client: MlflowClient, experiment_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
    with MLflowExperimentTracker() as tracker:
        tracker.log_param("source", "env")
        run_id = tracker.run_id
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    run = client.get_run(run_id or "")
    assert run.info.experiment_id == experiment.experiment_id
    assert run.data.params == {"source": "env"}


# ---------------------------------------------------------------------- engine knobs


def test_engine_defaults(clean_env: pytest.MonkeyPatch) -> None:
    resolved = EngineConfig.resolve()
    assert resolved == EngineConfig()
    assert resolved.queue_capacity == config.DEFAULT_QUEUE_CAPACITY
    assert resolved.flush_interval == config.DEFAULT_FLUSH_INTERVAL
    assert resolved.max_in_flight == config.DEFAULT_MAX_IN_FLIGHT
    assert resolved.exit_timeout == config.DEFAULT_EXIT_TIMEOUT
    assert resolved.flush_timeout == config.DEFAULT_FLUSH_TIMEOUT
    assert resolved.request_timeout == config.DEFAULT_REQUEST_TIMEOUT
    assert resolved.full_policy == config.DEFAULT_FULL_POLICY == "block"
    assert 5 <= config.DEFAULT_EXIT_TIMEOUT <= 15  # "about 10 s"


def test_environment_over_default(clean_env: pytest.MonkeyPatch) -> None:
    env = {
        "ASYNCTRACK_QUEUE_CAPACITY": "1234",
        "ASYNCTRACK_FLUSH_INTERVAL": "0.25",
        "ASYNCTRACK_MAX_IN_FLIGHT": " 2 ",
        "ASYNCTRACK_EXIT_TIMEOUT": "3",
        "ASYNCTRACK_FLUSH_TIMEOUT": "7.5",
        "ASYNCTRACK_REQUEST_TIMEOUT": "12",
        "ASYNCTRACK_FULL_POLICY": "DROP",
    }
    for name, value in env.items():
        clean_env.setenv(name, value)
    resolved = EngineConfig.resolve()
    assert resolved == EngineConfig(
        queue_capacity=1234,
        flush_interval=0.25,
        max_in_flight=2,
        exit_timeout=3.0,
        flush_timeout=7.5,
        request_timeout=12.0,
        full_policy="drop",
    )
    assert type(resolved.queue_capacity) is int


def test_keyword_over_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ASYNCTRACK_MAX_IN_FLIGHT", "2")
    clean_env.setenv("ASYNCTRACK_FULL_POLICY", "drop")
    clean_env.setenv("ASYNCTRACK_FLUSH_INTERVAL", "0.5")
    resolved = EngineConfig.resolve(max_in_flight=3, full_policy="raise", flush_interval=None)
    assert resolved.max_in_flight == 3
    assert resolved.full_policy == "raise"
    assert resolved.flush_interval == 0.5  # None: fall through to the environment


def test_blank_environment_variable_means_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ASYNCTRACK_QUEUE_CAPACITY", "  ")
    assert EngineConfig.resolve().queue_capacity == config.DEFAULT_QUEUE_CAPACITY


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("queue_capacity", 0),
        ("queue_capacity", -5),
        ("queue_capacity", 10.0),
        ("queue_capacity", "100"),
        ("queue_capacity", True),
        ("max_in_flight", 0),
        ("max_in_flight", math.nan),
        ("flush_interval", 0),
        ("flush_interval", -1.0),
        ("flush_interval", math.nan),
        ("flush_interval", "1"),
        ("flush_interval", True),
        ("exit_timeout", -0.1),
        ("exit_timeout", math.nan),
        ("flush_timeout", 0.0),
        ("request_timeout", [30]),
        ("full_policy", "wait"),
        ("full_policy", 3),
    ],
)
def test_invalid_keyword_raises_config_error(
    clean_env: pytest.MonkeyPatch, setting: str, value: Any
) -> None:
    with pytest.raises(ConfigError, match=setting) as caught:
        EngineConfig.resolve(**{setting: value})
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, asynctrack.AsyncTrackError)
    with pytest.raises(ValueError, match=setting):
        EngineConfig(**{setting: value})
    # The public entry point refuses it before touching any engine.
    with pytest.raises(ConfigError):
        asynctrack.configure(**{setting: value})


def test_unknown_setting_raises_config_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="queue_size"):
        EngineConfig.resolve(queue_size=10)
    with pytest.raises(ValueError, match="flush_every"):
        asynctrack.configure(flush_every=1.0)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("ASYNCTRACK_QUEUE_CAPACITY", "lots"),
        ("ASYNCTRACK_QUEUE_CAPACITY", "1.5"),
        ("ASYNCTRACK_QUEUE_CAPACITY", "0"),
        ("ASYNCTRACK_MAX_IN_FLIGHT", "-1"),
        ("ASYNCTRACK_FLUSH_INTERVAL", "soon"),
        ("ASYNCTRACK_FLUSH_INTERVAL", "nan"),
        ("ASYNCTRACK_EXIT_TIMEOUT", "0"),
        ("ASYNCTRACK_REQUEST_TIMEOUT", "-3"),
        ("ASYNCTRACK_FULL_POLICY", "wait"),
    ],
)
def test_invalid_environment_raises_config_error(
    clean_env: pytest.MonkeyPatch, variable: str, raw: str
) -> None:
    clean_env.setenv(variable, raw)
    setting = variable.removeprefix("ASYNCTRACK_").lower()
    with pytest.raises(ConfigError, match=f"(?i){setting}") as caught:
        EngineConfig.resolve()
    assert isinstance(caught.value, ValueError)
    # A keyword makes the bad variable irrelevant.
    good: dict[str, Any] = {"full_policy": "block"} if "POLICY" in variable else {setting: 2}
    assert getattr(EngineConfig.resolve(**good), setting) == good[setting]


def test_config_is_immutable(clean_env: pytest.MonkeyPatch) -> None:
    resolved = EngineConfig.resolve()
    with pytest.raises(AttributeError):
        resolved.queue_capacity = 5  # type: ignore[misc]


# ---------------------------------------------------------------------- secrets


def test_secret_never_shown(
    clean_env: pytest.MonkeyPatch,
    client: MlflowClient,
    experiment_name: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    clean_env.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", secret)
    importlib.reload(config)
    assert secret == config.AWS_SECRET_ACCESS_KEY

    shown: list[str] = [repr(EngineConfig.resolve()), str(EngineConfig.resolve())]
    clean_env.setenv("ASYNCTRACK_FLUSH_TIMEOUT", "later")
    for bad in ({"queue_capacity": 0}, {"full_policy": "wait"}, {"unknown": 1}, {}):
        with pytest.raises(ConfigError) as caught:
            EngineConfig.resolve(**bad)
        shown.append(str(caught.value))
    clean_env.delenv("ASYNCTRACK_FLUSH_TIMEOUT")
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)
    with tracker.start_run(run_name="secretive") as t:
        t.log_metric("m", 1.0)
        shown += [repr(tracker), repr(asynctrack.stats()), repr(t)]
        run_id = t.run_id
    shown.append(repr(tracker))

    out, err = capsys.readouterr()
    shown += [out, err, caplog.text]
    run = client.get_run(run_id or "")
    shown += [repr(run.data.tags), repr(run.data.params)]
    for text in shown:
        assert secret not in text
        assert SEED_DEFAULTS["AWS_SECRET_ACCESS_KEY"] not in text
    assert run.data.metrics == {"m": 1.0}
