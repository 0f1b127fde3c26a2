"""MLflow's own API under ``asynctrack.patch_mlflow()``, against plain MLflow, one server.

Run by hand: ``python benchmarks/bench_mlflow_patch.py [--lightning]``. It starts an MLflow
server (sqlite store, 4 uvicorn workers as MLflow's default) on 127.0.0.1, measures,
prints a table, stops it. Caller costs are measured as ``bench_core.py`` measures them
(wall time of a tight loop over the calls, the worker running, median of rounds); the
training-like loop's slowdown with the server pinned to its own core, so what is left is
the client's own cost.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric

sys.path.insert(0, str(Path(__file__).parent))

from bench_core import _pinned, per_call_us

import asynctrack
from asynctrack.testing import MlflowServer

CALLS = 200_000


def bench_fluent(results: dict[str, float]) -> None:
    with mlflow.start_run(run_name="plain-fluent"):
        results["plain mlflow.log_metric, synchronous (us)"] = per_call_us(
            lambda n: [mlflow.log_metric("m", float(i), step=i) for i in range(n)], 50, 1
        )
        results["plain mlflow.log_metric(synchronous=False) (us)"] = per_call_us(
            lambda n: [
                mlflow.log_metric("m", float(i), step=i, synchronous=False) for i in range(n)
            ],
            2000,
            1,
            settle=mlflow.flush_async_logging,
        )
        mlflow.flush_async_logging()
    with asynctrack.patch_mlflow(quiet=True), mlflow.start_run(run_name="patched-fluent"):
        log_metric = mlflow.log_metric

        def loop(n: int) -> None:
            for i in range(n):
                log_metric("m", 0.5, step=i)

        results["patched mlflow.log_metric (us)"] = per_call_us(
            loop, CALLS, settle=lambda: asynctrack.flush(600)
        )
        asynctrack.flush(600)


def bench_log_batch(results: dict[str, float]) -> None:
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    with asynctrack.patch_mlflow(quiet=True), mlflow.start_run(run_name="patched-log-batch"):
        run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
        batches = [[Metric(f"k{i % 50}", float(i), now, s * 1000 + i) for i in range(1000)]
                   for s in range(20)]  # fmt: skip

        def loop(n: int) -> None:
            for s in range(n):
                client.log_batch(run_id, metrics=batches[s % 20])

        us = per_call_us(loop, 100, settle=lambda: asynctrack.flush(600))
        results["patched MlflowClient.log_batch, 1000 metrics (ms)"] = us / 1000
        asynctrack.flush(600)


def bench_training_loop(server_pid: int, results: dict[str, float]) -> None:
    """About 1 ms of numpy work and 10 metrics a step through ``mlflow.log_metrics``."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    size = 100
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        while True:  # calibrate the matrix to about 1 ms a product
            a = rng.random((size, size))
            start = time.perf_counter()
            for _ in range(50):
                a @ a
            if (time.perf_counter() - start) / 50 >= 1e-3 or size > 2000:
                break
            size += 20

        def loop(steps: int, log: Callable[[dict[str, float], int], object] | None) -> float:
            start = time.perf_counter()
            for step in range(steps):
                loss = float((a @ a)[0, 0])
                if log is not None:
                    log({f"metric_{k}": loss + k for k in range(10)}, step)
            return time.perf_counter() - start

        def plain(metrics: dict[str, float], step: int) -> object:
            return mlflow.log_metrics(metrics, step=step)

        def plain_async(metrics: dict[str, float], step: int) -> object:
            return mlflow.log_metrics(metrics, step=step, synchronous=False)

        loop(300, None)  # warm up
        tracker = asynctrack.MLflowExperimentTracker("bench-mlflow-patch")

        def tracked(metrics: dict[str, float], step: int) -> object:
            tracker.log_metrics(metrics, step=step)
            return None

        # (label, steps, log, patched, run): asynctrack's own tracker is the reference,
        # measured in the same conditions as the patch.
        variants: list[tuple[str, int, Callable[[dict[str, float], int], object], bool]] = [
            ("plain MLflow", 60, plain, False),
            ("plain MLflow, synchronous=False", 600, plain_async, False),
            ("patched", 3000, plain, True),
            ("asynctrack tracker (reference)", 3000, tracked, False),
        ]
        for label, steps, log, patch in variants:
            base, logged = [], []
            patching = asynctrack.patch_mlflow(quiet=True) if patch else contextlib.nullcontext()
            run = tracker.start_run() if log is tracked else mlflow.start_run(run_name=label)
            with patching, run, _pinned(server_pid, True):
                for _ in range(3):
                    base.append(loop(steps, None))
                    logged.append(loop(steps, log))
                    mlflow.flush_async_logging()
                    asynctrack.flush(600)
            b, t = statistics.median(base), statistics.median(logged)
            results[f"training loop slowdown %, {label}"] = (t - b) / b * 100
        results["training loop step ms (no logging)"] = b / 3000 * 1e3


def bench_lightning(results: dict[str, float]) -> None:
    """Steps/s of a tiny CPU model logging every step: no logger, MLFlowLogger plain,
    ``synchronous=False``, and patched."""
    # Modules as values (typed Any), so the script type-checks without PyTorch installed.
    L: Any = importlib.import_module("lightning")
    torch: Any = importlib.import_module("torch")
    MLFlowLogger = importlib.import_module("lightning.pytorch.loggers").MLFlowLogger

    torch.set_num_threads(1)

    class Tiny(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(32, 1)

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(4096, 32), torch.randn(4096, 1))
    steps = 1024

    def fit(logger: Any) -> float:
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        trainer = L.Trainer(
            max_steps=steps, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(Tiny(), loader)
        return steps / (time.perf_counter() - start)

    uri = mlflow.get_tracking_uri()
    fit(False)  # warm up
    results["lightning steps/s, no logger"] = fit(False)
    # Lightning's own work for a logger that logs every step (moving and reducing the
    # logged values), with a logger that only appends to a local CSV file:
    csv_logger = importlib.import_module("lightning.pytorch.loggers").CSVLogger
    with tempfile.TemporaryDirectory() as csv_dir:
        results["lightning steps/s, CSVLogger (local file, reference)"] = fit(csv_logger(csv_dir))
    results["lightning steps/s, MLFlowLogger"] = fit(
        MLFlowLogger("bench-lightning", tracking_uri=uri)
    )
    results["lightning steps/s, MLFlowLogger(synchronous=False)"] = fit(
        MLFlowLogger("bench-lightning", tracking_uri=uri, synchronous=False)
    )
    with asynctrack.patch_mlflow(quiet=True):
        results["lightning steps/s, MLFlowLogger patched"] = fit(
            MLFlowLogger("bench-lightning", tracking_uri=uri)
        )
        asynctrack.flush(600)


def main() -> None:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, MlflowServer(Path(tmp), workers=4) as server:
        # the spool of a benchmark is thrown away with its server, not left for `sync`
        os.environ.setdefault("ASYNCTRACK_SPOOL_DIR", str(Path(tmp) / "spool"))
        mlflow.set_tracking_uri(server.url)
        mlflow.set_experiment("bench-mlflow-patch")
        assert server.pid is not None
        bench_fluent(results)
        bench_log_batch(results)
        bench_training_loop(server.pid, results)
        if "--lightning" in sys.argv:
            bench_lightning(results)
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.2f}")


if __name__ == "__main__":
    main()
