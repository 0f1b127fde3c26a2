"""Artifacts logged while their server is away, by a process that then exits normally: the
staged copies stay beside the spool (not in the job's temporary directory, which the test
removes, as batch systems do), and ``asynctrack sync`` uploads them byte for byte later.

Each test runs a child process against a real server: the session's MLflow server with
proxied artifacts behind a proxy the test stops (connection refused) and starts again on
the same port, or the direct-mode MLflow server with an S3 endpoint nobody listens on.
Everything is read back through MLflow and compared by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pytest
from children import child
from faults import FaultProxy

from asynctrack.testing import MlflowServer, free_port

if TYPE_CHECKING:
    from artifact_servers import ArtifactMode

pytest_plugins = ["artifact_servers"]

TEXT = "epoch 3: loss 0.25\n"
CONFIG = {"lr": 0.01, "layers": [64, 32]}

# argv: experiment, source folder, "model" or "". Creates its run while the server answers,
# waits for the test to take the server (or S3) away, logs, and exits normally: the exit
# ends the open run and gives up after ASYNCTRACK_EXIT_TIMEOUT seconds without progress.
_SCRIPT = f"""
import os, sys
from asynctrack import MLflowExperimentTracker

experiment, src, model = sys.argv[1], sys.argv[2], sys.argv[3] == "model"
tracker = MLflowExperimentTracker(experiment_name=experiment)
tracker.start_run().__enter__()  # left open: the exit ends it
print("run", tracker.run_id, flush=True)
sys.stdin.readline()  # the server is away from here on
tracker.log_artifact(os.path.join(src, "weights.bin"), "checkpoints")
tracker.log_text({TEXT!r}, "notes/log.txt")
tracker.log_dict({CONFIG!r}, "config.json")
tracker.log_artifacts(os.path.join(src, "plots"), "plots")
if model:
    import numpy as np
    from sklearn.linear_model import LinearRegression

    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 3.0]])
    fitted = LinearRegression().fit(X, X @ [1.0, 2.0] + 3.0)
    tracker.log_model(fitted, "regressor", pip_requirements=["scikit-learn", "skops"])
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources(tmp_path: Path) -> Path:
    src = tmp_path / "outputs"
    for name, size in (("weights.bin", 300_000), ("plots/loss.png", 20_000), ("plots/a/b.csv", 10)):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(size))
    return src


def log_during_outage(
    experiment: str, src: Path, env: dict[str, str], go_away: Callable[[], None], model: bool
) -> tuple[str, str]:
    """Run the child: its run id, and its stderr once it has exited (normally)."""
    args = [experiment, str(src), "model" if model else ""]
    with child(_SCRIPT, args, {"ASYNCTRACK_EXIT_TIMEOUT": "2", **env}) as proc:
        run_id = proc.expect("run")
        go_away()
        proc.send("go")
        code = proc.wait(120)
    assert code == 0, proc.stderr
    return run_id, proc.stderr


def sync(root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asynctrack.cli", "sync", str(root), *options],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),
    )


def assert_every_byte(url: str, run_id: str, src: Path, tmp_path: Path) -> None:
    """What the run holds is what the child logged, byte for byte."""
    got = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, dst_path=str(tmp_path / "download"), tracking_uri=url
        )
    )
    assert sha256(got / "checkpoints/weights.bin") == sha256(src / "weights.bin")
    assert (got / "notes/log.txt").read_text() == TEXT
    assert json.loads((got / "config.json").read_text()) == CONFIG
    for name in ("loss.png", "a/b.csv"):
        assert sha256(got / "plots" / name) == sha256(src / "plots" / name), name


def job_env(tmp_path: Path, uri: str) -> dict[str, str]:
    """The child's settings: its own spool root, and a temporary directory of its own that
    the test removes once it has exited (as a batch system does at a job's end)."""
    jobtmp = tmp_path / "jobtmp"
    jobtmp.mkdir()
    return {
        "MLFLOW_TRACKING_URI": uri,
        "ASYNCTRACK_SPOOL_DIR": str(tmp_path / "spool"),
        "TMPDIR": str(jobtmp),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # each attempt fails fast; ours retry
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("then", ["sync", "lose-one-then-sync", "discard"])
def test_proxied_artifacts_logged_while_the_server_is_away_are_kept_after_exit(
    then: str, mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path
) -> None:
    src, root = sources(tmp_path), tmp_path / "spool"
    with FaultProxy(mlflow_server.url, port=free_port()) as proxy:
        env = job_env(tmp_path, proxy.url)
        run_id, err = log_during_outage(experiment_name, src, env, proxy.stop, model=False)
        assert "could not be stored" in err and f"asynctrack sync {root}" in err, err
        shutil.rmtree(env["TMPDIR"])
        [staged] = root.glob("*/staged/*/notes/log.txt")
        assert staged.read_text() == TEXT  # kept beside the spool
        if then == "lose-one-then-sync":
            staged.unlink()
        proxy.start()  # the server answers again, at the URL the spool recorded
        result = sync(root, *(["--discard"] if then == "discard" else []))

    assert list(root.iterdir()) == []  # the spool and its staged copies are gone
    client = mlflow.MlflowClient(mlflow_server.url)
    stored = {f.path for f in client.list_artifacts(run_id)}
    if then == "discard":  # the user's explicit command: dropped, and said so
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"discarded 5 events of runs {run_id}" in result.stdout
        assert stored == set() and client.get_run(run_id).info.status == "RUNNING"
        return
    assert client.get_run(run_id).info.status == "FINISHED"
    if then == "sync":
        assert result.returncode == 0, result.stdout + result.stderr
        assert "stored 5 events, refused 0, 0 left\n" in result.stdout  # 4 uploads, the end
        assert_every_byte(mlflow_server.url, run_id, src, tmp_path)
        return
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stored 4 events, refused 0, 0 left, 1 lost" in result.stdout
    lost = f"lost: run {run_id}: artifact 'notes/log.txt': its staged copy is gone"
    assert lost in result.stdout
    assert stored == {"checkpoints", "config.json", "plots"}


@pytest.mark.timeout(300)
def test_direct_s3_artifacts_and_model_logged_while_s3_is_away_are_synced_after_exit(
    direct_mode: ArtifactMode, experiment_name: str, tmp_path: Path
) -> None:
    src, root = sources(tmp_path), tmp_path / "spool"
    env = job_env(tmp_path, direct_mode.url)
    env["MLFLOW_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nobody there
    run_id, err = log_during_outage(experiment_name, src, env, lambda: None, model=True)
    assert "could not be stored" in err, err
    shutil.rmtree(env["TMPDIR"])

    result = sync(root)  # with S3 reachable again (the test's own environment)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "stored 6 events, refused 0, 0 left\n" in result.stdout  # and the model, the end
    assert list(root.iterdir()) == []
    assert_every_byte(direct_mode.url, run_id, src, tmp_path)
    client = mlflow.MlflowClient(direct_mode.url)
    experiment_id = client.get_run(run_id).info.experiment_id
    # the dead process created a logged model before S3 failed it: it stays PENDING
    ready = [
        m
        for m in client.search_logged_models([experiment_id])
        if str(m.status) == "READY" and m.source_run_id == run_id
    ]
    [logged] = ready
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{logged.model_id}",
        dst_path=str(tmp_path / "model"),
        tracking_uri=direct_mode.url,
    )
    assert mlflow.sklearn.load_model(local).predict([[1.0, 1.0]]).tolist() == pytest.approx([6.0])
    assert client.get_run(run_id).info.status == "FINISHED"
