"""Replacements for ``MlflowClient``'s logging, artifact and read methods.

Writes go to the run's sink; reads first wait until what this process queued for the runs
they read is stored (bounded by the engine's ``flush_timeout``), so a caller sees its own
writes. Calls the engine cannot serve (a tracking URI it does not speak, metrics tied to
a logged model or a dataset, a directory given to ``log_artifact``) keep MLflow's path.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking.client import MlflowClient

from asynctrack._gate import PATCHED_CLIENT_METHODS, PlainClient
from asynctrack._mlflow import private, routing, sink

#: MLflow's own methods, called where the engine cannot serve a call.
ORIGINALS: dict[str, Any] = {name: getattr(PlainClient, name) for name in PATCHED_CLIENT_METHODS}

_FINISHED = RunStatus.to_string(RunStatus.FINISHED)
_model_id = private.active_model_id


def _sink(client: MlflowClient, run_id: str) -> sink.RunSink | None:
    return routing.sink_of(client.tracking_uri, run_id)


def log_metric(
    self: MlflowClient,
    run_id: str,
    key: str,
    value: float,
    timestamp: int | None = None,
    step: int | None = None,
    synchronous: bool | None = None,
    dataset_name: str | None = None,
    dataset_digest: str | None = None,
    model_id: str | None = None,
) -> Any:
    if model_id is None and dataset_name is None and dataset_digest is None:
        s = _sink(self, run_id)
        if s is not None and _model_id() is None:
            try:
                s.metric(key, value, timestamp, 0 if step is None else step)
            except MlflowException as exc:
                return routing.refuse(synchronous, exc)
            return routing.after(s, synchronous, None)
    return ORIGINALS["log_metric"](
        self, run_id, key, value, timestamp, step, synchronous, dataset_name, dataset_digest,
        model_id,
    )  # fmt: skip


def log_batch(
    self: MlflowClient,
    run_id: str,
    metrics: Sequence[Any] = (),
    params: Sequence[Any] = (),
    tags: Sequence[Any] = (),
    synchronous: bool | None = None,
) -> Any:
    s = _sink(self, run_id)
    if s is not None and _model_id() is None:
        rows: list[tuple[str, Any, int | None, int]] = []
        append = rows.append
        for m in metrics:
            if m.model_id is not None or m.dataset_name is not None:
                break  # tied to a model or a dataset: MLflow's path links them
            append((m.key, m.value, m.timestamp, m.step))
        else:
            if not rows and not params and not tags:
                return None
            try:
                s.batch(rows, [(p.key, p.value) for p in params], [(t.key, t.value) for t in tags])
            except MlflowException as exc:
                return routing.refuse(synchronous, exc)
            return routing.after(s, synchronous, None)
    return ORIGINALS["log_batch"](self, run_id, metrics, params, tags, synchronous)


def log_param(
    self: MlflowClient, run_id: str, key: str, value: Any, synchronous: bool | None = None
) -> Any:
    s = _sink(self, run_id)
    if s is None:
        return ORIGINALS["log_param"](self, run_id, key, value, synchronous)
    try:
        s.batch(params=[(key, value)])
    except MlflowException as exc:
        return routing.refuse(synchronous, exc)
    return routing.after(s, synchronous, value)


def set_tag(
    self: MlflowClient, run_id: str, key: str, value: Any, synchronous: bool | None = None
) -> Any:
    s = _sink(self, run_id)
    if s is None:
        return ORIGINALS["set_tag"](self, run_id, key, value, synchronous)
    try:
        s.batch(tags=[(key, value)])
    except MlflowException as exc:
        return routing.refuse(synchronous, exc)
    return routing.after(s, synchronous, None)


def delete_tag(self: MlflowClient, run_id: str, key: str) -> None:
    s = _sink(self, run_id)
    if s is not None:
        s.flush(report=False)  # ordered after the tags queued before it
    ORIGINALS["delete_tag"](self, run_id, key)


def set_terminated(
    self: MlflowClient, run_id: str, status: str | None = None, end_time: int | None = None
) -> None:
    """A barrier: the run ends after every event queued for it is stored."""
    s = _sink(self, run_id)
    if s is None:
        ORIGINALS["set_terminated"](self, run_id, status, end_time)
    elif end_time is None:
        s.end(status or _FINISHED)
        routing.print_run_url(s)
    else:  # the engine stamps the end itself: store the events, then MLflow's call
        s.flush()
        ORIGINALS["set_terminated"](self, run_id, status, end_time)


# ---------------------------------------------------------------------- artifacts

_runs_seen: dict[str, Any] = {}
_runs_lock = threading.Lock()


def _artifact_target(client: MlflowClient, run_id: str) -> tuple[sink.RunSink, Any] | None:
    """The run's sink and its entity (for the artifact URI), None for MLflow's path."""
    s = _sink(client, run_id)
    if s is None:
        return None
    entity = private.active_entity()
    if entity is None or entity.info.run_id != run_id:
        entity = _runs_seen.get(run_id)
    if entity is None:
        entity = ORIGINALS["get_run"](client, run_id)  # one GET per run, as MLflow makes
        with _runs_lock:
            if len(_runs_seen) > 1000:
                _runs_seen.clear()
            _runs_seen[run_id] = entity
    return s, entity


def log_artifact(
    self: MlflowClient, run_id: str, local_path: Any, artifact_path: str | None = None
) -> None:
    target = None if os.path.isdir(local_path) else _artifact_target(self, run_id)
    if target is None:
        return ORIGINALS["log_artifact"](self, run_id, local_path, artifact_path)  # type: ignore[no-any-return]
    target[0].log_files(target[1], "log_artifact", local_path, artifact_path)
    return None


def log_artifacts(
    self: MlflowClient, run_id: str, local_dir: str, artifact_path: str | None = None
) -> None:
    target = _artifact_target(self, run_id)
    if target is None:
        return ORIGINALS["log_artifacts"](self, run_id, local_dir, artifact_path)  # type: ignore[no-any-return]
    target[0].log_files(target[1], "log_artifacts", local_dir, artifact_path)
    return None


def log_text(self: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    target = _artifact_target(self, run_id)
    if target is None:
        return ORIGINALS["log_text"](self, run_id, text, artifact_file)  # type: ignore[no-any-return]
    target[0].log_files(target[1], "log_text", text, artifact_file)
    return None


def log_dict(self: MlflowClient, run_id: str, dictionary: Any, artifact_file: str) -> None:
    target = _artifact_target(self, run_id)
    if target is None:
        return ORIGINALS["log_dict"](self, run_id, dictionary, artifact_file)  # type: ignore[no-any-return]
    target[0].log_files(target[1], "log_dict", dictionary, artifact_file)
    return None


def log_figure(
    self: MlflowClient,
    run_id: str,
    figure: Any,
    artifact_file: str,
    *,
    save_kwargs: dict[str, Any] | None = None,
) -> None:
    target = _artifact_target(self, run_id)
    if target is None:
        ORIGINALS["log_figure"](self, run_id, figure, artifact_file, save_kwargs=save_kwargs)
        return
    target[0].log_files(target[1], "log_figure", figure, artifact_file, save_kwargs=save_kwargs)


# ---------------------------------------------------------------------- reads


def _settle(client: MlflowClient, run_ids: list[str] | None) -> None:
    sink.flush_for_read(client.tracking_uri, run_ids)


def get_run(self: MlflowClient, run_id: str) -> Any:
    _settle(self, [run_id])
    return ORIGINALS["get_run"](self, run_id)


def get_metric_history(self: MlflowClient, run_id: str, key: str) -> Any:
    _settle(self, [run_id])
    return ORIGINALS["get_metric_history"](self, run_id, key)


def search_runs(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
    _settle(self, None)  # which runs match is the server's to say: everything queued
    return ORIGINALS["search_runs"](self, *args, **kwargs)


def list_artifacts(self: MlflowClient, run_id: str, path: str | None = None) -> Any:
    _settle(self, [run_id])
    return ORIGINALS["list_artifacts"](self, run_id, path)


def download_artifacts(
    self: MlflowClient, run_id: str, path: str, dst_path: str | None = None
) -> Any:
    _settle(self, [run_id])
    return ORIGINALS["download_artifacts"](self, run_id, path, dst_path)
