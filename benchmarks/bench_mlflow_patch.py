"""MLflow's own API under ``asynctrack.patch_mlflow()``, against plain MLflow, one server.

Run by hand: ``python benchmarks/bench_mlflow_patch.py [--lightning | --lightning-only]``.
It starts an MLflow server (sqlite store, 4 uvicorn workers as MLflow's default) on
127.0.0.1, measures, prints a table, stops it. Caller costs are measured as
``bench_core.py`` measures them (wall time of a tight loop over the calls, the worker
running, median of rounds); the training-like loop's slowdown with the server pinned to
its own core, so what is left is the client's own cost.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
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


def bench_lightning(server_pid: int) -> None:
    """Steps/s of a tiny CPU model logging every step (2 metrics: ``loss``, ``epoch``).

    The configurations take turns, round after round, each round starting with the next
    one (median of rounds), so a load that comes and goes hits them alike; the server is
    pinned to its own core, as in the training loop. Controls: a logger that does nothing
    (Lightning's own cost of any logger), ``CSVLogger``, and ``MLFlowLogger`` whose
    ``log_batch`` does nothing (what Lightning's and MLflow's own work costs: creating the
    run, ending it, the ``Metric`` entities, before any metric is sent). "Steady" counts
    steps 100 to the end only; "fit" is the whole ``Trainer.fit``, with the run's creation
    and end.
    """
    # Modules as values (typed Any), so the script type-checks without PyTorch installed.
    L: Any = importlib.import_module("lightning")
    torch: Any = importlib.import_module("torch")
    loggers: Any = importlib.import_module("lightning.pytorch.loggers")

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

    class NoOpLogger(loggers.Logger):  # type: ignore[misc]
        name, version = "noop", 0

        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            pass

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    class Clock(L.Callback):  # type: ignore[misc]
        def __init__(self, steps: int) -> None:
            self.steps, self.marks = steps, {}

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.marks["train"] = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step in (100, self.steps):
                self.marks[trainer.global_step] = time.perf_counter()

    data = torch.utils.data.TensorDataset(torch.randn(8192, 32), torch.randn(8192, 1))

    def fit(logger: Any, steps: int = 1024) -> dict[str, float]:
        clock = Clock(steps)
        trainer = L.Trainer(
            max_steps=steps, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
            callbacks=[clock],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
        end, m = time.perf_counter(), clock.marks
        return {
            "fit": steps / (end - start),
            "steady": (steps - 100) / (m[steps] - m[100]),
            "start ms": (m["train"] - start) * 1e3,
            "end ms": (end - m[steps]) * 1e3,
        }

    uri = mlflow.get_tracking_uri()

    def mlflow_logger(**kwargs: Any) -> Any:
        return loggers.MLFlowLogger("bench-lightning", tracking_uri=uri, **kwargs)

    class NotSending(loggers.MLFlowLogger):  # type: ignore[misc]
        """Creates and ends its run in ``fit`` as MLFlowLogger does; sends no metric."""

        @property
        def experiment(self) -> Any:
            client = super().experiment
            client.log_batch = lambda *args, **kwargs: None  # this client only
            return client

    def not_sending() -> Any:
        return NotSending("bench-lightning", tracking_uri=uri)

    csv_dir = tempfile.mkdtemp()
    variants: dict[str, Callable[[], Any]] = {
        "no logger": lambda: False,
        "no-op Logger": NoOpLogger,
        "CSVLogger": lambda: loggers.CSVLogger(csv_dir),
        "MLFlowLogger, log_batch a no-op": not_sending,
        "MLFlowLogger patched": mlflow_logger,
    }
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    load = os.getloadavg()
    with _pinned(server_pid, True):
        fit(False)  # warm up
        names = list(variants)
        for round_ in range(5):
            # each round starts with another configuration: what follows a run's end (the
            # server settling) falls on each in turn
            for name in names[round_:] + names[:round_]:
                make = variants[name]
                patching = asynctrack.patch_mlflow(quiet=True) if "patched" in name else None
                with patching or contextlib.nullcontext():
                    measured[name].append(fit(make()))
        # Plain MLflow once each, after the others: far slower, and MLflow's async
        # logging leaves its threads behind.
        measured["MLFlowLogger plain"] = [fit(mlflow_logger(), steps=200)]
        measured["MLFlowLogger(synchronous=False)"] = [
            fit(mlflow_logger(synchronous=False), steps=400)
        ]
    shutil.rmtree(csv_dir, ignore_errors=True)
    base = {k: statistics.median(r[k] for r in measured["no logger"]) for k in ("fit", "steady")}
    print(
        f"Lightning, steps/s (median of 5 rounds, configurations interleaved); "
        f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"{'':34}{'fit':>8}{'%':>6}{'steady':>8}{'%':>6}{'start ms':>10}{'end ms':>9}")
    for name, runs in measured.items():
        m = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"{name:34}{m['fit']:8.1f}{m['fit'] / base['fit'] * 100:6.1f}{m['steady']:8.1f}"
            f"{m['steady'] / base['steady'] * 100:6.1f}{m['start ms']:10.1f}{m['end ms']:9.1f}"
        )


def main() -> None:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, MlflowServer(Path(tmp), workers=4) as server:
        # the spool of a benchmark is thrown away with its server, not left for `sync`
        os.environ.setdefault("ASYNCTRACK_SPOOL_DIR", str(Path(tmp) / "spool"))
        mlflow.set_tracking_uri(server.url)
        mlflow.set_experiment("bench-mlflow-patch")
        assert server.pid is not None
        if "--lightning-only" not in sys.argv:
            bench_fluent(results)
            bench_log_batch(results)
            bench_training_loop(server.pid, results)
        if "--lightning" in sys.argv or "--lightning-only" in sys.argv:
            bench_lightning(server.pid)
    width = max((len(k) for k in results), default=0)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.2f}")


if __name__ == "__main__":
    main()
