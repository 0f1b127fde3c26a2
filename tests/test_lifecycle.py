"""The engine's lifecycle against a real server: outages, process exit, and fork.

Nothing here sleeps to synchronise: flushes, run ends, process joins and pipes do.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import mlflow
import pytest
from faults import pipe

import asynctrack
from asynctrack import FlushTimeoutError, MLflowExperimentTracker
from asynctrack.testing import MlflowServer


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


class Relay:
    """A TCP relay to a real server: closing it makes the server unreachable for whoever
    was pointed at the relay, without stopping the server for everyone else."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                if self._closed:
                    downstream.close()
                    upstream.close()
                    return
                self._sockets += [downstream, upstream]
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=pipe, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# ---------------------------------------------------------------------------- server outage


@pytest.mark.timeout(240)
def test_server_stopped_and_restarted_during_run_loses_nothing(
    tmp_path: Path, experiment_name: str
) -> None:
    with MlflowServer(tmp_path) as server:
        tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=server.url)
        with tracker.start_run():
            run_id = tracker.run_id
            assert run_id is not None
            for i in range(100):
                tracker.log_metric("loss", float(i), step=i)
            tracker.log_param("before", 1)
            tracker.set_tag("phase", "up")
            tracker.flush()
            retried_before = tracker.stats().retried

            server.stop()
            for i in range(100, 1500):
                tracker.log_metric("loss", float(i), step=i)
            tracker.log_param("during", 2)
            tracker.set_tag("phase", "down")
            # Makes the worker try (and fail) now, without sleeping.
            with pytest.raises(FlushTimeoutError):
                tracker.flush(timeout=2)

            server.start()
            for i in range(1500, 1600):
                tracker.log_metric("loss", float(i), step=i)
            tracker.log_param("after", 3)
            tracker.set_tag("phase", "back")
        # The run's end stored everything, then set the status.
        assert tracker.stats().retried > retried_before
        assert tracker.stats().queued == 0
        client = mlflow.MlflowClient(tracking_uri=server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert history(client, run_id, "loss") == [(i, float(i)) for i in range(1600)]
        assert run.data.params == {"before": "1", "during": "2", "after": "3"}
        assert run.data.tags["phase"] == "back"


# ---------------------------------------------------------------------------- process exit

_EXIT_SCRIPT = """
import sys
from asynctrack import MLflowExperimentTracker

tracker = MLflowExperimentTracker(experiment_name=sys.argv[1])
tracker.start_run().__enter__()  # left open: the interpreter's exit must deal with it
for i in range(100):
    tracker.log_metric("before", float(i), step=i)
tracker.flush()
print(tracker.run_id, flush=True)
sys.stdin.readline()  # the test makes the server unreachable, then lets us go on
for i in range({after}):
    tracker.log_metric("after", float(i), step=i)
print("exiting", flush=True)
"""


def _run_script(
    script: str, url: str, experiment_name: str, extra_env: dict[str, str]
) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, **extra_env}
    return subprocess.Popen(
        [sys.executable, "-c", script, experiment_name],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _exit_with_server_unreachable(
    client: mlflow.MlflowClient,
    server: MlflowServer,
    experiment_name: str,
    extra_env: dict[str, str],
) -> None:
    relay = Relay(server.port)
    env = {"ASYNCTRACK_EXIT_TIMEOUT": "2", **extra_env}
    proc = _run_script(_EXIT_SCRIPT.format(after=500), relay.url, experiment_name, env)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.communicate(timeout=60)[1]
        relay.close()  # nothing listens there any more
        proc.stdin.write("go\n")
        proc.stdin.flush()
        # The failure bound (the exit deadline is 2 s): a hung exit never gets here.
        out, err = proc.communicate(timeout=20)
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "exiting" in out
    # the 500 metrics and the end of the run left open
    assert f"asynctrack: 501 event(s) could not be stored at {relay.url}" in err
    assert "at exit: 2 s passed without progress" in err
    # What was flushed before the outage is on the server; nothing after it.
    assert history(client, run_id, "before") == [(i, float(i)) for i in range(100)]
    assert history(client, run_id, "after") == []


@pytest.mark.timeout(120)
def test_exit_with_server_unreachable_is_bounded_and_counts_losses(
    client: mlflow.MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """asynctrack's own exit hook, with MLflow's request retries off (see the next test)."""
    _exit_with_server_unreachable(
        client, mlflow_server, experiment_name, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    )


@pytest.mark.timeout(120)
def test_exit_with_server_unreachable_is_bounded_with_default_mlflow_settings(
    client: mlflow.MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    _exit_with_server_unreachable(client, mlflow_server, experiment_name, {})


@pytest.mark.timeout(120)
def test_exit_sends_what_is_still_queued(
    client: mlflow.MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    """A script that logs and exits without flushing: the exit hook stores it all."""
    proc = _run_script(
        _EXIT_SCRIPT.format(after=2000),
        mlflow_server.url,
        experiment_name,
        {"ASYNCTRACK_EXIT_TIMEOUT": "30"},
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        run_id = proc.stdout.readline().strip()
        assert run_id, proc.communicate(timeout=60)[1]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "could not be stored" not in err
    assert history(client, run_id, "after") == [(i, float(i)) for i in range(2000)]


# ---------------------------------------------------------------------------- fork


def test_forked_child_logs_to_the_same_run(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    with tracker.start_run():
        for i in range(100):  # still queued at the fork: the child must not send them
            tracker.log_metric("parent", float(i), step=i)
        tracker.log_param("parent_param", 1)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                os.close(read_end)
                for i in range(50):
                    tracker.log_metric("child", float(i), step=i)
                tracker.log_param("child_param", 2)
                asynctrack.flush()
                report = {"ok": True, "stats": tracker.stats().as_dict()}
                code = 0
            except BaseException:
                report = {"ok": False, "error": traceback.format_exc()}
            finally:
                with contextlib.suppress(BaseException):
                    os.write(write_end, json.dumps(report).encode())
                    os.close(write_end)
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            report = json.loads(pipe.read() or '{"ok": false, "error": "no report"}')
        _, status = os.waitpid(pid, 0)
        assert report["ok"], report.get("error")
        assert os.waitstatus_to_exitcode(status) == 0
        # The child sent its own 51 events and none of the parent's.
        assert report["stats"]["sent"] == 51
        assert report["stats"]["queued"] == 0
        for i in range(100, 150):
            tracker.log_metric("parent", float(i), step=i)
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert history(client, run_id, "parent") == [(i, float(i)) for i in range(150)]
    assert history(client, run_id, "child") == [(i, float(i)) for i in range(50)]
    assert run.data.params == {"parent_param": "1", "child_param": "2"}


def _mp_child(tracker: MLflowExperimentTracker, flush: bool) -> None:
    for i in range(50):
        tracker.log_metric("mp_child", float(i), step=i)
    tracker.set_tag("mp_child_tag", "yes")
    if flush:
        tracker.flush()


def _run_mp_child(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker, flush: bool
) -> None:
    ctx = multiprocessing.get_context("fork")
    with tracker.start_run():
        for i in range(100):
            tracker.log_metric("parent", float(i), step=i)
        process = ctx.Process(target=_mp_child, args=(tracker, flush))
        process.start()
        process.join(60)
        assert process.exitcode == 0
        for i in range(100, 120):
            tracker.log_metric("parent", float(i), step=i)
        run_id = tracker.run_id
    assert history(client, run_id, "parent") == [(i, float(i)) for i in range(120)]
    assert history(client, run_id, "mp_child") == [(i, float(i)) for i in range(50)]
    assert client.get_run(run_id).data.tags.get("mp_child_tag") == "yes"


def test_multiprocessing_fork_child_that_flushes(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    _run_mp_child(client, tracker, flush=True)


def test_multiprocessing_fork_child_events_arrive_without_flush(
    client: mlflow.MlflowClient, tracker: MLflowExperimentTracker
) -> None:
    _run_mp_child(client, tracker, flush=False)
