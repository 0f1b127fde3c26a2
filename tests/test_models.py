"""``log_model``: saved at the call, logged in the background as an MLflow 3 logged model of
the run, loaded back through MLflow from ``runs:/`` and ``models:/`` URIs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import mlflow
import mlflow.pyfunc
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from sklearn.datasets import load_diabetes
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split

from asynctrack import AccessDeniedError, DeliveryError, MLflowExperimentTracker

if TYPE_CHECKING:
    from artifact_servers import ArtifactMode

# The servers are session fixtures: loaded as a plugin, they start once for both modules.
pytest_plugins = ["artifact_servers"]

# skops, MLflow's default format, refuses to load tree models unless told to trust them.
TREES = ["sklearn.tree._tree.Tree"]
# Explicit requirements skip the (10 s) inference where a test is not about it.
REQS = ["scikit-learn", "skops"]


@pytest.fixture(autouse=True)
def _no_mlflow_read_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading ``runs:/<run>/<name>`` tries the run's own artifacts first; a proxied server
    answers 500 for the missing path and MLflow's client retries that for minutes before
    it falls back to the logged model. Reads here fail fast instead."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@contextlib.contextmanager
def global_tracking_uri(url: str) -> Iterator[None]:
    """mlflow.*.load_model reads the process-wide tracking URI: set it, then put it back."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    mlflow.set_tracking_uri(url)
    try:
        yield
    finally:
        utils._tracking_uri = before


@pytest.fixture(scope="module")
def diabetes() -> tuple[pd.DataFrame, pd.DataFrame, pd.Series, pd.Series]:
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
    return X_train, X_test, y_train, y_test


def test_seed_log_model_example(
    artifact_mode: ArtifactMode, experiment_name: str, diabetes: tuple[pd.DataFrame, ...]
) -> None:
    """The seed's example, registered model included; requirements inferred as MLflow does."""
    X_train, X_test, y_train, _ = diabetes
    registered = f"{experiment_name}-gb"
    tracker = MLflowExperimentTracker(
        experiment_name=experiment_name, tracking_uri=artifact_mode.url
    )
    with tracker.start_run(run_name="gradient-boosting-v1"):
        tracker.log_params({"n_estimators": 50, "max_depth": 3})
        model = GradientBoostingRegressor(n_estimators=50, max_depth=3).fit(X_train, y_train)
        handle = tracker.log_model(  # as the seed writes it
            model,
            artifact_path="model",
            input_example=X_test.head(5),
            registered_model_name=registered,
        )
        run_id = tracker.run_id
        assert handle.runs_uri == f"runs:/{run_id}/model"
    info = handle.wait()
    assert info.model_uri == handle.model_uri == f"models:/{handle.model_id}"
    assert int(info.registered_model_version) == 1
    assert info.signature is not None
    assert info.flavors["sklearn"]["skops_trusted_types"] == TREES  # trusted for the seed
    assert [c.name for c in info.signature.inputs.inputs] == list(X_test.columns)

    client = mlflow.MlflowClient(artifact_mode.url)
    logged = client.get_logged_model(handle.model_id)
    assert logged.source_run_id == run_id
    assert logged.name == "model"
    assert logged.status == LoggedModelStatus.READY
    assert logged.params == {"n_estimators": "50", "max_depth": "3"}
    run = client.get_run(run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [handle.model_id]
    version = client.get_model_version(registered, "1")
    assert version.source == handle.model_uri

    expected = model.predict(X_test)
    with global_tracking_uri(artifact_mode.url):
        for uri in (f"runs:/{run_id}/model", handle.model_uri, f"models:/{registered}/1"):
            np.testing.assert_allclose(mlflow.sklearn.load_model(uri).predict(X_test), expected)
            np.testing.assert_allclose(mlflow.pyfunc.load_model(uri).predict(X_test), expected)
        requirements = mlflow.pyfunc.get_model_dependencies(handle.model_uri)
    with open(requirements) as f:
        lines = f.read().splitlines()
    assert any(line.startswith("scikit-learn==") for line in lines)
    assert any(line.startswith("mlflow==") for line in lines)


def test_model_is_what_it_was_at_the_call(
    direct_mode: ArtifactMode, experiment_name: str, diabetes: tuple[pd.DataFrame, ...]
) -> None:
    X_train, X_test, y_train, _ = diabetes
    model = Ridge(alpha=1.0).fit(X_train, y_train)
    expected = model.predict(X_test)
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    with tracker.start_run():
        handle = tracker.log_model(model, "ridge", pip_requirements=REQS)
        model.fit(X_train, -y_train)  # retrained right after the call
        tracker.log_metric("after", 1.0)
    assert handle.done()  # the run's end waited for the model
    np.testing.assert_allclose(
        mlflow.sklearn.load_model(handle.model_uri).predict(X_test), expected
    )
    stats = tracker.stats()
    assert stats.files_queued == 0 and stats.files_uploaded >= 5


async def test_log_model_in_async_code(
    artifact_mode: ArtifactMode, experiment_name: str, diabetes: tuple[pd.DataFrame, ...]
) -> None:
    X_train, X_test, y_train, _ = diabetes
    model = Ridge().fit(X_train, y_train)
    tracker = MLflowExperimentTracker(
        experiment_name=experiment_name, tracking_uri=artifact_mode.url
    )
    async with tracker.start_run():
        handle = tracker.log_model(model, name="ridge", pip_requirements=REQS)
        info = await handle.wait_async()
        run_id = tracker.run_id
    assert info.model_uri == handle.model_uri
    with global_tracking_uri(artifact_mode.url):
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/ridge")
    np.testing.assert_allclose(loaded.predict(X_test), model.predict(X_test))


def test_invalid_names_raise_at_the_call(
    direct_mode: ArtifactMode, experiment_name: str, diabetes: tuple[pd.DataFrame, ...]
) -> None:
    X_train, _, y_train, _ = diabetes
    model = Ridge().fit(X_train, y_train)
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    with tracker.start_run():
        for name in ("../model", "/abs", "a/b", "v1.2", ""):
            with pytest.raises(ValueError, match="invalid model name"):
                tracker.log_model(model, name, pip_requirements=REQS)
        handle = tracker.log_model(model, "kept", pip_requirements=REQS)
    assert handle.wait().model_uri == handle.model_uri


def test_tree_storage_trusted_unless_the_caller_says_otherwise(
    direct_mode: ArtifactMode, experiment_name: str, diabetes: tuple[pd.DataFrame, ...]
) -> None:
    X_train, X_test, y_train, _ = diabetes
    forest = RandomForestRegressor(n_estimators=5, random_state=0).fit(X_train, y_train)
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    with tracker.start_run():
        with pytest.raises(MlflowException, match="untrusted types"):
            tracker.log_model(forest, "refused", skops_trusted_types=[], pip_requirements=REQS)
        pickled = tracker.log_model(
            forest, "pickled", serialization_format="cloudpickle", pip_requirements=REQS
        )
        trusted = tracker.log_model(forest, "trusted", pip_requirements=REQS)
    assert pickled.wait().flavors["sklearn"]["skops_trusted_types"] is None
    with global_tracking_uri(direct_mode.url):
        loaded = mlflow.sklearn.load_model(trusted.model_uri)
    np.testing.assert_allclose(loaded.predict(X_test), forest.predict(X_test))


def test_model_denied_for_credentials_is_kept_then_logged_once_fixed(
    direct_mode: ArtifactMode,
    experiment_name: str,
    diabetes: tuple[pd.DataFrame, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    X_train, _, y_train, _ = diabetes
    model = Ridge().fit(X_train, y_train)
    good_key = os.environ["AWS_ACCESS_KEY_ID"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAVALIDKEY0000")
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    client = mlflow.MlflowClient(direct_mode.url)
    with tracker.start_run():
        handle = tracker.log_model(model, "ridge", pip_requirements=REQS)
        tracker.log_param("alpha", 1.0)
        with pytest.raises(AccessDeniedError, match="InvalidAccessKeyId"):
            tracker.flush()
        with pytest.raises(AccessDeniedError, match="InvalidAccessKeyId"):
            handle.wait()  # at once: the model is kept, not failed
        assert client.get_logged_model(handle.model_id).status == LoggedModelStatus.PENDING
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", good_key)  # fixed: the next try gets through
    info = handle.wait()
    assert info.model_uri == f"models:/{handle.model_id}"
    assert client.get_logged_model(handle.model_id).status == LoggedModelStatus.READY
    assert client.get_run(handle.run_id).info.status == "FINISHED"


def test_refused_model_upload_is_reported_and_model_marked_failed(
    direct_mode: ArtifactMode, experiment_name: str, diabetes: tuple[pd.DataFrame, ...]
) -> None:
    X_train, _, y_train, _ = diabetes
    model = Ridge().fit(X_train, y_train)
    client = mlflow.MlflowClient(direct_mode.url)
    client.create_experiment(experiment_name, artifact_location="s3://no-such-bucket-here/x")
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    with pytest.raises(DeliveryError, match="NoSuchBucket"), tracker.start_run():
        handle = tracker.log_model(model, "ridge", pip_requirements=REQS)
        tracker.log_param("alpha", 1.0)
    with pytest.raises(DeliveryError, match=r"model 'ridge'.*MLmodel.*NoSuchBucket"):
        handle.wait()
    assert client.get_logged_model(handle.model_id).status == LoggedModelStatus.FAILED
    assert client.get_run(handle.run_id).data.params == {"alpha": "1.0"}
