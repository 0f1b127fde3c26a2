"""The gate to MLflow's internals (``asynctrack._gate``): each entry against the installed
MLflow."""

from __future__ import annotations

from mlflow.tracking.client import MlflowClient

import asynctrack
from asynctrack import _gate


def test_plain_client_keeps_mlflow_methods_under_the_patch() -> None:
    own = {name: MlflowClient.__dict__[name] for name in _gate.PATCHED_CLIENT_METHODS}
    with asynctrack.patch_mlflow(quiet=True):
        for name, method in own.items():
            assert MlflowClient.__dict__[name] is not method, f"{name} was not patched"
            assert getattr(_gate.PlainClient, name) is method, f"PlainClient.{name} is patched"
        assert isinstance(_gate.plain_client("sqlite:///unused.db"), MlflowClient)
