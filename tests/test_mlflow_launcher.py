"""``asynctrack run`` and the environment switch: plain MLflow programs, patched without
a code change, in the program and in the processes it spawns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import asynctrack_mlflow_hook
from asynctrack import _gate
from asynctrack._mlflow import fluent

SCRIPTS = Path(__file__).parent / "mlflow_scripts"
ASYNCTRACK = str(Path(sys.executable).parent / "asynctrack")


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_spawned_workers_each_land_every_point_once(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCTRACK_PATCH")}
    script = str(SCRIPTS / "spawn_workers.py")
    done = _run([ASYNCTRACK, "run", "--", sys.executable, script, experiment_name], env)
    run_id = done.stdout.strip().splitlines()[-1]
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(4 * 300))
    assert {f"rank{r}" for r in range(4)} <= set(run.data.metrics)
    assert {run.data.tags[f"patched.{r}"] for r in range(4)} == {"True"}
    assert run.info.status == "FINISHED"
    assert done.stderr.count("MLflow logging goes through asynctrack") == 1


def test_env_switch_alone_patches_on_import(mlflow_tracking_uri: str) -> None:
    code = (
        "import mlflow\n"
        "assert hasattr(mlflow.log_metric, '__asynctrack_original__')\n"
        "mlflow.flush_async_logging()  # the first call installs the patch\n"
        "from asynctrack._mlflow.patch import is_patched\n"
        "assert is_patched() and mlflow.log_metric.__module__ == 'asynctrack._mlflow.fluent'\n"
    )
    env = dict(os.environ, ASYNCTRACK_PATCH_MLFLOW="1")
    _run([sys.executable, "-c", code], env)
    env["ASYNCTRACK_PATCH_MLFLOW"] = "0"
    off = "import mlflow\nassert not hasattr(mlflow.log_metric, '__asynctrack_original__')\n"
    _run([sys.executable, "-c", off], env)


def test_hook_names_match_the_patch() -> None:
    assert asynctrack_mlflow_hook.FLUENT_NAMES == fluent.NAMES
    assert asynctrack_mlflow_hook.CLIENT_NAMES == _gate.PATCHED_CLIENT_METHODS


def test_run_left_open_is_ended_at_exit_after_its_events(
    client: mlflow.MlflowClient, experiment_name: str
) -> None:
    code = (
        "import sys, mlflow, asynctrack\n"
        "asynctrack.patch_mlflow()\n"
        f"mlflow.set_experiment({experiment_name!r})\n"
        "run = mlflow.start_run()\n"
        "for i in range(500):\n"
        "    mlflow.log_metric('m', float(i), step=i)\n"
        "print('run', run.info.run_id)\n"
    )
    done = _run([sys.executable, "-c", code], dict(os.environ))
    run_id = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("run "))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "m")) == 500
