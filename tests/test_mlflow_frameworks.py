"""Framework integrations under the patch: Keras 3 (JAX backend, CPU) in CI; Lightning and
Hugging Face behind the ``torch`` marker (skipped cleanly without PyTorch)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import mlflow
import pytest

import asynctrack


@pytest.fixture
def patched() -> Iterator[None]:
    with asynctrack.patch_mlflow(quiet=True):
        yield
    asynctrack.flush()


# In a process of its own: JAX starts threads when imported, and a fork in this test process
# afterwards (several tests fork) could deadlock in them.
_KERAS_SCRIPT = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import numpy as np
import keras
import mlflow
import mlflow.keras
import mlflow.keras.callback

import asynctrack
from asynctrack._mlflow import fluent

assert keras.backend.backend() == "jax", keras.backend.backend()
with asynctrack.patch_mlflow(quiet=True):
    # the callback module's own `from mlflow import log_metrics` copy is patched too
    assert mlflow.keras.callback.log_metrics is fluent.log_metrics
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 4)), rng.random((64, 1))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    mlflow.set_experiment(sys.argv[1])
    with mlflow.start_run() as run:
        model.fit(
            x, y, batch_size=8, epochs=3, verbose=0, validation_split=0.25,
            callbacks=[mlflow.keras.MlflowCallback(log_every_epoch=True)],
        )
        model.fit(
            x, y, batch_size=8, epochs=2, verbose=0,
            callbacks=[mlflow.keras.MlflowCallback(log_every_epoch=False, log_every_n_steps=1)],
        )
    asynctrack.flush()
print("run", run.info.run_id)
"""


@pytest.mark.slow
def test_keras_callback_stores_every_epoch_and_batch_metric(
    client: mlflow.MlflowClient, mlflow_tracking_uri: str, experiment_name: str
) -> None:
    for package in ("keras", "jax"):  # not imported here (see _KERAS_SCRIPT)
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_tracking_uri}
    done = subprocess.run(
        [sys.executable, "-c", _KERAS_SCRIPT, experiment_name],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split("run ")[-1].strip()
    epochs = client.get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in epochs) == [0, 1, 2]
    batches = client.get_metric_history(run_id, "mae")
    # 3 epochs (steps 0-2) of 6 batches, then 2 epochs of 8 batches logged at the
    # optimizer's iterations (19 to 34): every one stored, once
    assert sorted(m.step for m in batches) == [0, 1, 2, *range(19, 35)]
    stored = client.get_run(run_id)
    assert stored.data.params["optimizer_name"] == "sgd"
    assert "model_summary.txt" in [f.path for f in client.list_artifacts(run_id)]


torch_only = pytest.mark.torch


@torch_only
def test_lightning_mlflow_logger_stores_every_step(
    client: mlflow.MlflowClient, mlflow_tracking_uri: str, experiment_name: str, patched: None
) -> None:
    # Modules as values (typed Any): the same types whether PyTorch is installed or not.
    torch: Any = pytest.importorskip("torch")
    L: Any = pytest.importorskip("lightning")
    MLFlowLogger = pytest.importorskip("lightning.pytorch.loggers").MLFlowLogger

    class Tiny(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
    logger = MLFlowLogger(experiment_name, tracking_uri=mlflow_tracking_uri)
    trainer = L.Trainer(
        max_steps=100, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    logger.finalize("success")
    history = client.get_metric_history(logger.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(100))
    assert client.get_run(logger.run_id).info.status == "FINISHED"


@torch_only
def test_hugging_face_trainer_reports_every_logging_step(
    client: mlflow.MlflowClient, experiment_name: str, patched: None, tmp_path: Any
) -> None:
    torch: Any = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    class Regression(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def forward(self, x: Any, labels: Any = None) -> dict[str, Any]:
            out = self.layer(x)
            loss = torch.nn.functional.mse_loss(out, labels)
            return {"loss": loss, "logits": out}

    class Data(torch.utils.data.Dataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return 128

        def __getitem__(self, i: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(8, generator=g), "labels": torch.randn(1, generator=g)}

    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment_name
    try:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=40, logging_steps=1, report_to=["mlflow"],
            per_device_train_batch_size=4, save_strategy="no", use_cpu=True,
        )  # fmt: skip
        with mlflow.start_run() as run:
            transformers.Trainer(model=Regression(), args=args, train_dataset=Data()).train()
    finally:
        del os.environ["MLFLOW_EXPERIMENT_NAME"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 41))


@torch_only
def test_pytorch_autolog_with_lightning_lands_in_the_run(
    client: mlflow.MlflowClient, experiment_name: str, patched: None
) -> None:
    torch: Any = pytest.importorskip("torch")
    L: Any = pytest.importorskip("lightning")
    import mlflow.pytorch

    class Tiny(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss)
            self.log("loss_epoch_mean", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randn(32, 1))
    # No model logging: autolog then ties metrics to a logged model, which keeps MLflow's
    # own path (see docs/mlflow.md); everything else goes through the engine.
    mlflow.pytorch.autolog(log_models=False, checkpoint=False, log_every_n_step=1)
    sent_before = asynctrack.stats().sent
    try:
        mlflow.set_experiment(experiment_name)
        with mlflow.start_run() as run:
            trainer = L.Trainer(
                max_epochs=2, logger=False, enable_progress_bar=False,
                enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
            )  # fmt: skip
            trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    finally:
        mlflow.pytorch.autolog(disable=True)
    run_id = run.info.run_id
    # 2 epochs of 8 batches: every step's loss (at the global step after it, as autolog
    # logs it), each epoch's mean, the optimizer's params
    steps = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in steps) == list(range(1, 17))
    epochs = client.get_metric_history(run_id, "loss_epoch_mean")
    assert sorted(m.step for m in epochs) == [0, 1]
    stored = client.get_run(run_id)
    assert stored.data.params["optimizer_name"] == "SGD"
    assert stored.data.params["lr"] == "0.01"
    assert stored.data.params["epochs"] == "2"
    assert stored.info.status == "FINISHED"
    # ...and they went through the engine, not MLflow's own path
    assert asynctrack.stats().sent - sent_before >= 16 + 2 + 3
