"""The engine's spool against the real server: what a new process says about spools that
processes which died left behind, opt-in recovery, and forked children's own spools."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from faults import wait_until

from asynctrack import MLflowExperimentTracker
from asynctrack._engine import spool

_CHILD = """
import sys
from asynctrack import MLflowExperimentTracker
tracker = MLflowExperimentTracker(experiment_name=sys.argv[1])
with tracker.start_run(run_name="new"):
    tracker.log_metric("fresh", 1.0, step=0)
    print("logged", flush=True)
    sys.stdin.readline()
"""


def _dead_spool(root: Path, uri: str, run_id: str, steps: int) -> Path:
    """What a process killed mid-run leaves: a spool directory whose lock nobody holds."""
    writer = spool.Writer(root, uri, segment_bytes=1 << 20, limit_bytes=1 << 30)
    events = [(run_id, "orphan", float(i), 1_700_000_000 + i, i) for i in range(steps)]
    writer.append(spool.encode(events))
    writer.close(empty=False)
    return writer.directory


def _child(experiment_name: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, experiment_name],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception" not in err, err  # a clean exit, quietly
    return out, err


@pytest.mark.parametrize("recover", [False, True])
def test_a_new_process_reports_dead_spools_and_replays_them_when_asked(
    client: mlflow.MlflowClient, experiment_name: str, tmp_path: Path, recover: bool
) -> None:
    root = tmp_path / "spool"
    run_id = client.create_run(client.create_experiment(experiment_name)).info.run_id
    orphan = _dead_spool(root, client.tracking_uri, run_id, 50)
    env = {"ASYNCTRACK_SPOOL_DIR": str(root), "MLFLOW_TRACKING_URI": client.tracking_uri}
    if recover:
        env["ASYNCTRACK_SPOOL_RECOVER"] = "1"
    proc = _child(experiment_name + "-new", env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "logged"

    def replayed() -> bool:
        return len(client.get_metric_history(run_id, "orphan")) == 50 and not orphan.exists()

    if recover:
        wait_until(replayed, 60, "the orphan replayed by the new process")
    _, err = _finish(proc)

    if recover:
        assert "replaying 1 spool(s) left by processes that ended" in err
        assert sorted(m.step for m in client.get_metric_history(run_id, "orphan")) == list(
            range(50)
        )
        assert not orphan.exists()
        assert client.get_run(run_id).info.status == "FAILED"  # its process died mid-run
    else:
        assert f"run `asynctrack sync {root}` to send them" in err
        assert client.get_metric_history(run_id, "orphan") == []
        assert orphan.exists()  # left for the user's sync
    # the new process's own spool is gone: everything it logged was stored
    assert [d.directory for d in spool.scan(root)] == ([] if recover else [orphan])


def _forked_child(experiment_name: str, uri: str) -> None:
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=uri)
    with tracker.start_run(run_name="child"):
        for i in range(100):
            tracker.log_metric("child", float(i), step=i)


def test_a_forked_child_spools_on_its_own_and_leaves_the_parents_spool_alone(
    client: mlflow.MlflowClient,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    import asynctrack

    uri = client.tracking_uri.replace("127.0.0.1", "localhost")  # an engine of its own
    asynctrack.configure_engine(uri, spool_dir=str(tmp_path))
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=uri)
    with tracker.start_run(run_name="parent"):
        tracker.log_metric("parent", 1.0, step=0)
        tracker.flush(30)
        [parent_dir] = spool.scan(tmp_path)
        assert parent_dir.alive
        child = multiprocessing.get_context("fork").Process(
            target=_forked_child, args=(experiment_name, uri)
        )
        child.start()
        child.join(60)
        assert child.exitcode == 0
        # the child's spool was removed at its exit (all stored); the parent's still lives
        assert [(d.directory, d.alive) for d in spool.scan(tmp_path)] == [
            (parent_dir.directory, True)
        ]
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment_name).experiment_id],
        filter_string="attributes.run_name = 'child'",
    )
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "child")] == list(
        range(100)
    )
