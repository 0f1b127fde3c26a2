"""Querying runs and driving the model registry: synchronous, on MlflowClient and pandas.

Every query first waits until what this process logged has reached the server
(read-your-writes); refusals stay queued for your own next ``flush()``. Searches page
through all results. A missing experiment, metric or model raises
:class:`LookupError` naming it.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterator
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run as MlflowRun

from asynctrack._engine import all_engines

__all__ = [
    "compare_runs",
    "delete_experiment_runs",
    "get_best_run",
    "get_experiment_summary",
    "get_run_by_name",
    "list_registered_models",
    "load_best_model",
    "register_best_model",
    "transition_model_stage",
]

_PAGE = 1000
_STAGE_ALIASES = {"staging", "production", "archived"}


def _client() -> MlflowClient:
    for engine in all_engines():  # read-your-writes: what we logged is on the server first
        engine.flush(report=False)
    return MlflowClient()


def _experiment_id(client: MlflowClient, experiment_name: str) -> str:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"experiment {experiment_name!r} does not exist")
    return str(experiment.experiment_id)


def _runs(
    client: MlflowClient, experiment_id: str, order_by: list[str] | None = None, **kw: Any
) -> Iterator[MlflowRun]:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], order_by=order_by, max_results=_PAGE, page_token=token, **kw
        )
        yield from page
        token = page.token
        if not token:
            return


def _as_dict(run: MlflowRun) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        "status": run.info.status,
    }


def _ranked(
    client: MlflowClient, experiment_name: str, metric: str, ascending: bool
) -> list[MlflowRun]:
    """Runs that have ``metric``, best first; ties go to the most recent run."""
    runs = list(_runs(client, _experiment_id(client, experiment_name)))
    with_metric = _rank(runs, metric, ascending)
    if not with_metric:
        raise LookupError(f"no run of experiment {experiment_name!r} has metric {metric!r}")
    return with_metric


def _rank(runs: list[MlflowRun], metric: str, ascending: bool) -> list[MlflowRun]:
    """The runs with a (non-NaN) ``metric``, best first; ties go to the most recent run."""
    with_metric = [
        r for r in runs if metric in r.data.metrics and not math.isnan(r.data.metrics[metric])
    ]
    with_metric.sort(key=lambda r: -r.info.start_time)
    with_metric.sort(key=lambda r: r.data.metrics[metric], reverse=not ascending)
    return with_metric


def get_best_run(
    experiment_name: str, metric: str = "r2_score", ascending: bool = False
) -> dict[str, Any]:
    """The run with the highest ``metric`` (lowest with ``ascending=True``)."""
    client = _client()
    return _as_dict(_ranked(client, experiment_name, metric, ascending)[0])


def get_run_by_name(experiment_name: str, run_name: str) -> dict[str, Any] | None:
    """The most recent run called ``run_name``, or None."""
    client = _client()
    # MLflow's filter grammar has no escapes: quote with a character the name lacks (a name
    # with both quotes is matched here instead of on the server).
    quote = next((q for q in ("'", '"') if q not in run_name), None)
    filter_string = f"attributes.run_name = {quote}{run_name}{quote}" if quote else ""
    for run in _runs(
        client,
        _experiment_id(client, experiment_name),
        order_by=["attributes.start_time DESC"],
        filter_string=filter_string,
    ):
        if run.info.run_name == run_name:
            return _as_dict(run)
    return None


def _logged_model_of(client: MlflowClient, experiment_id: str, run_ids: list[str]) -> Any:
    """The first of ``run_ids`` (in order) that logged a model, with that model."""
    models: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment_id], max_results=100, page_token=token
        )
        for model in page:
            if model.source_run_id and model.source_run_id not in models:
                models[model.source_run_id] = model
        token = page.token
        if not token:
            break
    for run_id in run_ids:
        if run_id in models:
            return models[run_id]
    return None


def _best_model(experiment_name: str, metric: str, ascending: bool) -> Any:
    client = _client()
    ranked = _ranked(client, experiment_name, metric, ascending)
    model = _logged_model_of(client, ranked[0].info.experiment_id, [r.info.run_id for r in ranked])
    if model is None:
        raise LookupError(
            f"no run of experiment {experiment_name!r} with metric {metric!r} logged a model"
        )
    return model


def load_best_model(experiment_name: str, metric: str = "r2_score", ascending: bool = False) -> Any:
    """Load the model of the best run that logged one (its sklearn flavor when it has one)."""
    import mlflow.pyfunc
    import mlflow.sklearn

    model = _best_model(experiment_name, metric, ascending)
    uri = f"models:/{model.model_id}"
    try:
        return mlflow.sklearn.load_model(uri)
    except Exception:  # not a scikit-learn model: the generic flavor
        return mlflow.pyfunc.load_model(uri)


def register_best_model(
    experiment_name: str, model_name: str, metric: str = "r2_score", ascending: bool = False
) -> str:
    """Register the best run's model as a new version of ``model_name``; return the version."""
    import mlflow

    model = _best_model(experiment_name, metric, ascending)
    version = mlflow.register_model(f"models:/{model.model_id}", model_name)
    return str(version.version)


def compare_runs(
    experiment_name: str, metrics: list[str] | None = None, top_n: int = 10
) -> pd.DataFrame:
    """A table of runs: run_id, run_name, status, start_time, metric_<m>..., param_<p>...

    Sorted by the first metric, highest first (with ``metrics=None``: every metric, sorted
    by r2_score when present, else the first name alphabetically); runs without it last.
    """
    client = _client()
    runs = list(_runs(client, _experiment_id(client, experiment_name)))
    present = sorted({m for r in runs for m in r.data.metrics})
    if metrics is None:
        names = present
        sort_by = "r2_score" if "r2_score" in present else (present[0] if present else None)
    else:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise LookupError(
                f"no run of experiment {experiment_name!r} has metric(s) {', '.join(missing)}"
            )
        names, sort_by = list(metrics), (metrics[0] if metrics else None)
    params = sorted({p for r in runs for p in r.data.params})
    rows = [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "status": r.info.status,
            "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
            **{f"metric_{m}": r.data.metrics.get(m, math.nan) for m in names},
            **{f"param_{p}": r.data.params.get(p) for p in params},
        }
        for r in runs
    ]
    columns = ["run_id", "run_name", "status", "start_time"]
    columns += [f"metric_{m}" for m in names] + [f"param_{p}" for p in params]
    table = pd.DataFrame(rows, columns=columns)
    if sort_by is not None and not table.empty:
        table = table.sort_values(
            [f"metric_{sort_by}", "start_time"], ascending=[False, False], na_position="last"
        )
    return table.head(top_n).reset_index(drop=True)


def delete_experiment_runs(
    experiment_name: str,
    keep_top_n: int,
    metric: str = "r2_score",
    ascending: bool = False,
    dry_run: bool = True,
) -> list[dict[str, Any]]:
    """Delete all but the ``keep_top_n`` best runs (MLflow's restorable "deleted" stage).

    Runs without the metric (or with NaN) go first; runs still RUNNING are never deleted.
    Returns the runs deleted, or that would be with ``dry_run=True``. A metric no run has
    raises LookupError.
    """
    if keep_top_n < 0:
        raise ValueError(f"keep_top_n must be >= 0, got {keep_top_n}")
    client = _client()
    runs = list(_runs(client, _experiment_id(client, experiment_name)))
    ranked = _rank(runs, metric, ascending)
    if runs and not ranked:  # a misspelt metric must not doom every run
        raise LookupError(f"no run of experiment {experiment_name!r} has metric {metric!r}")
    kept = {r.info.run_id for r in ranked[:keep_top_n]}
    doomed = [r for r in runs if r.info.run_id not in kept and r.info.status != "RUNNING"]
    if not dry_run:
        for run in doomed:
            client.delete_run(run.info.run_id)
    return [_as_dict(r) for r in doomed]


def get_experiment_summary(experiment_name: str) -> dict[str, Any]:
    """Counts by status, the seed's r2/rmse figures, and min/max/mean for every metric."""
    client = _client()
    runs = list(_runs(client, _experiment_id(client, experiment_name)))
    values: dict[str, list[float]] = {}
    for run in runs:
        for name, value in run.data.metrics.items():
            if not math.isnan(value):
                values.setdefault(name, []).append(value)
    r2, rmse = values.get("r2_score"), values.get("rmse")
    return {
        "total_runs": len(runs),
        "finished_runs": sum(r.info.status == "FINISHED" for r in runs),
        "failed_runs": sum(r.info.status == "FAILED" for r in runs),
        "best_r2": max(r2) if r2 else None,
        "best_rmse": min(rmse) if rmse else None,
        "avg_r2": statistics.fmean(r2) if r2 else None,
        "metrics": {
            name: {
                "count": len(v),
                "min": min(v),
                "max": max(v),
                "mean": statistics.fmean(v),
            }
            for name, v in sorted(values.items())
        },
    }


def list_registered_models() -> pd.DataFrame:
    """Every registered model: name, latest_version, latest_stage, aliases."""
    client = _client()
    rows = []
    token = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        for model in page:
            versions = client.search_model_versions(f"name = '{model.name}'")
            latest = max(versions, key=lambda v: int(v.version), default=None)
            rows.append(
                {
                    "name": model.name,
                    "latest_version": latest.version if latest else None,
                    "latest_stage": latest.current_stage if latest else None,
                    "aliases": dict(model.aliases or {}),
                }
            )
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows, columns=["name", "latest_version", "latest_stage", "aliases"])


def transition_model_stage(
    model_name: str, version: str | int, stage: str, archive_existing: bool = True
) -> Any:
    """Move a version to ``stage`` (Staging, Production, Archived, None).

    Stages are deprecated in MLflow 3, so the version also gets the alias named after the
    stage in lower case (``models:/name@production``), and loses the alias of the stage it
    left; MLflow's deprecation warning is silenced. Returns the updated ModelVersion.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LookupError(f"model {model_name!r} has no version {version}") from None
    # MLflow refuses (500, retried for minutes) archive_existing into Archived or None.
    archive = archive_existing and stage.lower() in ("staging", "production")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        updated = client.transition_model_version_stage(
            model_name, str(version), stage, archive_existing_versions=archive
        )
    # The version left its old stage: the aliases of the other stages no longer name it.
    aliases = client.get_registered_model(model_name).aliases or {}
    for alias in _STAGE_ALIASES - {stage.lower()}:
        if str(aliases.get(alias)) == str(version):
            client.delete_registered_model_alias(model_name, alias)
    if stage.lower() != "none":
        client.set_registered_model_alias(model_name, stage.lower(), str(version))
    return updated
