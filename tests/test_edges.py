"""Nothing is lost at the edges of a real deployment (issue 21): a full spool disk with the
server away, a run ended during an outage, refused credentials and permissions.

Each child process here is a training script on its own: it exits normally, and what it
left is delivered later by ``asynctrack sync``, read back from the real server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from faults import FaultProxy

from asynctrack.testing import MlflowServer

pytestmark = pytest.mark.slow


def child(code: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        input=stdin,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def sync(spool: Path, uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asynctrack.cli", "sync", str(spool), "--tracking-uri", uri],
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB file system for the spool (a tmpfs: needs root, as CI runs)."""
    where = tmp_path / "tiny"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a 1 MB tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# A training loop through a proxy the test turns off once the run exists.
_LOOP = """
import json, sys
import asynctrack
from asynctrack import FlushTimeoutError

asynctrack.configure(spool_dir=sys.argv[1], flush_timeout=2, exit_timeout=2, queue_capacity=5000)
tracker = asynctrack.MLflowExperimentTracker(experiment_name=sys.argv[2], tracking_uri=sys.argv[3])
try:
    with tracker.start_run(run_name="edge"):
        print(tracker.run_id, flush=True)
        sys.stdin.readline()  # the server goes away now
        for step in range(int(sys.argv[4])):
            tracker.log_metric("loss", 1.0 / (step + 1), step=step)
        tracker.log_param("done", "yes")
except FlushTimeoutError:
    pass  # the run's end could not reach the server: kept, for sync
print(json.dumps(asynctrack.stats().as_dict()), flush=True)
"""


def run_loop(
    spool: Path, proxy: FaultProxy, experiment: str, steps: int
) -> tuple[str, dict[str, object], str]:
    """Run the loop; the server answers 503 once the run exists. Returns the run id, the
    child's final stats and its stderr."""
    process = subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(spool), experiment, proxy.url, str(steps)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    run_id = process.stdout.readline().strip()
    proxy.fail(503)
    process.stdin.write("go\n")
    process.stdin.flush()
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err  # the job's exit status is its own
    return run_id, json.loads(out.strip().splitlines()[-1]), err


def test_a_full_spool_disk_never_stops_training(
    client: mlflow.MlflowClient, mlflow_server: MlflowServer, experiment_name: str, tiny_disk: Path
) -> None:
    steps = 300_000
    with FaultProxy(mlflow_server.url) as proxy:
        run_id, stats, err = run_loop(tiny_disk, proxy, experiment_name, steps)
    # The loop ran to its end: one wait of flush_timeout, then what did not fit was dropped,
    # counted by reason and named once on stderr and once in the exit summary.
    dropped = stats["dropped"]
    assert isinstance(dropped, int) and 0 < dropped < steps
    assert list(stats["dropped_reasons"].values()) == [dropped]  # type: ignore[attr-defined]
    assert err.count("training goes on") == 2, err  # when it starts, and at exit
    kept = int(re.search(r"(\d+) of them are kept in the spool", err).group(1))  # type: ignore[union-attr]
    assert 0 < kept < steps - dropped
    done = sync(tiny_disk, mlflow_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    steps_stored = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps_stored == list(range(kept))  # what fit, in order, once
    # the run's end did not fit on the full disk either: sync ends it as a crash's
    assert client.get_run(run_id).info.status == "FAILED"


def test_a_run_ended_during_an_outage_is_ended_later_with_its_own_time(
    client: mlflow.MlflowClient, mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path
) -> None:
    with FaultProxy(mlflow_server.url) as proxy:
        run_id, stats, err = run_loop(tmp_path / "spool", proxy, experiment_name, 1000)
    left_at = int(time.time() * 1000)
    assert "could not be stored" in err and stats["dropped"] == 0
    done = sync(tmp_path / "spool", mlflow_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # as the script ended it, not FAILED
    assert run.info.end_time <= left_at  # its own end, not the sync's
    assert run.data.params == {"done": "yes"}
    assert len(client.get_metric_history(run_id, "loss")) == 1000
