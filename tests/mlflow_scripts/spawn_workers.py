"""Run by tests/test_mlflow_launcher.py under `asynctrack run`: four spawned worker
processes log to one run with plain MLflow code; prints the run id."""

from __future__ import annotations

import multiprocessing
import sys

import mlflow

POINTS = 300


def work(run_id: str, rank: int) -> None:
    from asynctrack._mlflow.patch import is_patched

    with mlflow.start_run(run_id=run_id):
        for i in range(POINTS):
            mlflow.log_metric("loss", 1.0 / (i + 1), step=rank * POINTS + i)
        mlflow.MlflowClient().log_batch(
            run_id, metrics=[mlflow.entities.Metric(f"rank{rank}", rank, 1000, 0)]
        )
        mlflow.set_tag(f"patched.{rank}", str(is_patched()))


def main() -> None:
    mlflow.set_experiment(sys.argv[1])
    with mlflow.start_run() as run:
        mlflow.log_param("workers", 4)
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=work, args=(run.info.run_id, r)) for r in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
            assert w.exitcode == 0, w.exitcode
    print(run.info.run_id)


if __name__ == "__main__":
    main()
