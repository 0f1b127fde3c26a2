"""The differential: one workload through plain MLflow and under the patch, into two
experiments of one store, read back through plain ``MlflowClient`` and compared field by
field (``test_mlflow_patch.py`` on the HTTP server, ``test_dropin_stores.py`` on local
stores)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag

import asynctrack

T0 = 1_700_000_000_000  # a fixed metric timestamp (ms), so both sides store the same


def experiment(name: str) -> str:
    return mlflow.set_experiment(name).experiment_id


def both(
    workload: Callable[[], None], experiment_name: str, tmp_path: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``workload`` plain and patched; return the stored runs of each, normalised."""
    plain_id = experiment(experiment_name + "-plain")
    workload()
    patched_id = experiment(experiment_name + "-patched")
    with asynctrack.patch_mlflow(quiet=True):
        workload()
        mlflow.flush_async_logging()
    client = mlflow.MlflowClient()
    return (
        stored(client, plain_id, tmp_path / "plain"),
        stored(client, patched_id, tmp_path / "patched"),
    )


def stored(client: mlflow.MlflowClient, experiment_id: str, dst: Path) -> list[dict[str, Any]]:
    runs = client.search_runs([experiment_id], max_results=1000)
    names = {r.info.run_id: r.info.run_name for r in runs}
    out = []
    for run in runs:
        start = run.info.start_time
        tags = dict(run.data.tags)
        if "mlflow.parentRunId" in tags:
            tags["mlflow.parentRunId"] = names[tags["mlflow.parentRunId"]]
        for volatile in ("mlflow.log-model.history",):
            if volatile in tags:
                tags[volatile] = "<set>"
        histories = {}
        for key in run.data.metrics:
            rows = []
            for m in client.get_metric_history(run.info.run_id, key):
                stamp: int | str = m.timestamp
                if not T0 <= m.timestamp < T0 + 10**6:  # "now": not before the run started
                    assert start - 1 <= m.timestamp, (key, m.timestamp, start)
                    stamp = "now"
                rows.append((m.step, repr(float(m.value)), stamp))
            histories[key] = sorted(rows, key=repr)
        out.append(
            {
                "name": run.info.run_name,
                "status": run.info.status,
                "params": dict(run.data.params),
                "tags": tags,
                "metrics": histories,
                "artifacts": artifacts(client, run.info.run_id, dst / run.info.run_name),
                "models": len(run.outputs.model_outputs) if run.outputs else 0,
            }
        )
    return sorted(out, key=lambda r: r["name"])


def artifacts(client: mlflow.MlflowClient, run_id: str, dst: Path) -> dict[str, bytes]:
    if not client.list_artifacts(run_id):
        return {}
    dst.mkdir(parents=True)
    root = Path(client.download_artifacts(run_id, "", str(dst)))
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_same(plain: list[dict[str, Any]], patched: list[dict[str, Any]]) -> None:
    assert [r["name"] for r in patched] == [r["name"] for r in plain]
    for a, b in zip(plain, patched, strict=True):
        for field in a:
            assert b[field] == a[field], f"run {a['name']}: {field} differs"


def workload(files: Path) -> Callable[[], None]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.linear_model import LinearRegression

    (files / "dir" / "sub").mkdir(parents=True, exist_ok=True)
    (files / "one.bin").write_bytes(bytes(range(256)) * 10)
    (files / "dir" / "a.txt").write_text("a")
    (files / "dir" / "sub" / "b.txt").write_text("b")

    def workload() -> None:
        client = mlflow.MlflowClient()
        with mlflow.start_run(run_name="parent") as parent:
            run_id = parent.info.run_id
            mlflow.log_param("int", 3)
            mlflow.log_params({"float": 0.1, "str": "s", "none": None, "list": [1, 2]})
            mlflow.log_param("again", "same")
            mlflow.log_param("again", "same")  # equal value: accepted by both
            values = [1.5, 2, float("nan"), float("inf"), -float("inf"), np.float32(0.25)]
            for i, value in enumerate(values):
                mlflow.log_metric("stepped", value, step=i, timestamp=T0 + i)
            mlflow.log_metric("defaults", 7.0)
            mlflow.log_metric("step_only", 8.0, step=5)
            mlflow.log_metrics({"a": 1, "b": np.float64(2.5)}, step=7, timestamp=T0 + 100)
            mlflow.log_metrics({"c": 3.0})
            mlflow.set_tag("t", "1")
            mlflow.set_tags({"t2": 2, "t": "overwritten"})
            mlflow.set_tag("gone", "x")
            mlflow.delete_tag("gone")
            client.log_batch(
                run_id,
                metrics=[Metric("batch", 0.5, T0 + 7, 3), Metric("batch", 0.75, T0 + 8, 4)],
                params=[Param("p_batch", "v")],
                tags=[RunTag("bt", "v")],
            )
            client.log_metric(run_id, "client", 4.0, timestamp=T0 + 9, step=9)
            client.log_param(run_id, "client_param", 1)
            client.set_tag(run_id, "client_tag", "c")
            mlflow.log_dict({"k": [1, 2], "n": {"x": None}}, "d/data.json")
            mlflow.log_dict({"k": [1, 2]}, "d/data.yaml")
            mlflow.log_text("héllo\n", "notes.txt")
            figure, ax = plt.subplots()
            ax.plot([1, 2, 3])
            mlflow.log_figure(figure, "fig.png", save_kwargs={"metadata": {"Software": None}})
            plt.close(figure)
            mlflow.log_artifact(str(files / "one.bin"), "files")
            mlflow.log_artifacts(str(files / "dir"), "tree")
            model = LinearRegression().fit([[0.0], [1.0], [2.0]], [0.0, 1.0, 2.0])
            mlflow.sklearn.log_model(model, name="model")
            with mlflow.start_run(run_name="child", nested=True):
                mlflow.log_metric("child_m", 1.0, step=1, timestamp=T0 + 50)
        with pytest.raises(ZeroDivisionError), mlflow.start_run(run_name="failed"):
            mlflow.log_metric("before_failure", 1.0, step=0, timestamp=T0)
            _ = 1 / 0
        run = client.create_run(current_experiment_id())
        client.set_tag(run.info.run_id, "mlflow.runName", "client-run")
        client.log_metric(run.info.run_id, "m", 1.0, timestamp=T0, step=1)
        client.set_terminated(run.info.run_id, "KILLED")

    return workload


def current_experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id

    return str(_get_experiment_id())
