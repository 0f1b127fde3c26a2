"""A fleet: eight processes, one run each, one MLflow server on PostgreSQL, answers late.

Every child logs its metrics, a param and a tag through asynctrack with a 3 s request
timeout, behind a fault proxy that holds each ``log-batch`` answer 5 s after the server
stored the batch: every child gives up on requests the server has already stored, and
sends them again. Once each child has seen its own retries (it says so on stdout), the
proxy passes answers through again. Then everything is read back from the server directly
with plain MLflow: every point exactly once, every run FINISHED, and no child reports a
refusal.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import mlflow
import pytest
from children import child
from faults import FaultProxy
from test_faults_crash import child_env

from asynctrack.testing import MlflowPostgresServer

PROCESSES = 8
STEPS = 1000  # x 2 keys: 2,000 metrics a process
LOG_BATCH = "log-batch"

CHILD = """
import json, sys, time
from asynctrack import DeliveryError, MLflowExperimentTracker

experiment, index, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tracker = MLflowExperimentTracker(experiment_name=experiment)
try:
    with tracker.start_run(run_name=f"proc-{index}"):
        print("run", tracker.run_id)
        for step in range(steps):
            tracker.log_metric("loss", 1.0 / (step + 1) + index, step=step)
            tracker.log_metric("acc", step / 1000 + index, step=step)
        tracker.log_param("index", index)
        tracker.set_tag("stage", "logged")
        # Each child waits until one of its own requests timed out and is being sent again.
        deadline = time.monotonic() + 60
        while tracker.stats().retried == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        print("retried", tracker.stats().retried)
        tracker.flush(120)
        tracker.set_tag("stage", "done")
    tracker.flush(60)  # the run's end is stored too
    print("report", json.dumps({"stats": tracker.stats().as_dict(), "rejections": []}))
except DeliveryError as exc:
    rejections = [str(r) for r in exc.rejections]
    print("report", json.dumps({"stats": tracker.stats().as_dict(), "rejections": rejections}))
"""


@pytest.mark.slow  # eight interpreters importing MLflow: 40 s to 2 min on a busy 2-core machine
@pytest.mark.timeout(300)
def test_eight_processes_with_late_answers_store_every_point_once(
    mlflow_server_pg: MlflowPostgresServer, experiment_name: str, tmp_path: Path
) -> None:
    with FaultProxy(mlflow_server_pg.url) as proxy, ExitStack() as stack:
        # Before the children start, so their first batches already meet it; creating the
        # runs and reading them goes through untouched.
        proxy.delay(5.0, path=LOG_BATCH)
        # One request in flight per child, and a timeout above what the server takes on a
        # loaded machine. The session's server has one worker, whose database pool holds 15
        # connections, and MLflow's log_batch takes a second one while holding the first:
        # 15 log_batch at once wait on each other until the pool's 30 s timeout. Requests
        # abandoned by the client still run there, and their re-sends add to them: with 2
        # in flight per child, or a 1 s timeout on a busy machine, the server stalls for
        # minutes (see the branch report of issue 12).
        env = child_env(
            proxy.url,
            tmp_path / "spool",
            ASYNCTRACK_REQUEST_TIMEOUT="3",
            ASYNCTRACK_MAX_IN_FLIGHT="1",
        )
        children = [
            stack.enter_context(child(CHILD, [experiment_name, str(i), str(STEPS)], env))
            for i in range(PROCESSES)
        ]
        run_ids = [c.expect("run", timeout=120) for c in children]
        retried = [int(c.expect("retried", timeout=120)) for c in children]
        assert all(retried), retried  # a child whose wait ran out says 0
        proxy.pass_through()
        reports = [json.loads(c.expect("report", timeout=120)) for c in children]
        codes = [c.wait(60) for c in children]
    assert codes == [0] * PROCESSES, [c.stderr[-2000:] for c in children]
    for report in reports:
        assert report["rejections"] == []
        assert (report["stats"]["rejected"], report["stats"]["dropped"]) == (0, 0)
        assert report["stats"]["retried"] > 0
    assert proxy.count(LOG_BATCH, "delayed") >= PROCESSES

    client = mlflow.MlflowClient(tracking_uri=mlflow_server_pg.url)
    for index, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"index": str(index)}
        assert run.data.tags["stage"] == "done"
        # Sorted, so a point stored twice shows up as a repeated entry.
        loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        acc = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "acc"))
        assert loss == [(s, 1.0 / (s + 1) + index) for s in range(STEPS)]
        assert acc == [(s, s / 1000 + index) for s in range(STEPS)]
