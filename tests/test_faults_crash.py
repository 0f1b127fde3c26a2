"""Crashes and unreachable servers against real processes: what the spool keeps, and what
``asynctrack sync`` / ``asynctrack status`` make of it.

Every scenario runs a child Python process that logs through asynctrack, with its own spool
root (``ASYNCTRACK_SPOOL_DIR``), and reads everything back from a real MLflow server. The
server is made unreachable either by stopping a dedicated ``MlflowServer`` (restarted later
on the same port and store) or by a ``Gate``: a TCP relay in front of a server that the test
closes (connection refused) or turns into a black hole (requests accepted and never
answered, so they stay in flight).

Nothing sleeps to synchronise: the tests wait for lines the children print, for process
exits, and for state they can observe (the children poll their own ``stats()`` with a
deadline).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
from children import Child, child
from faults import pipe
from mlflow import MlflowClient

from asynctrack.testing import MlflowServer

_HOST = "127.0.0.1"
KEYS = ("loss", "accuracy", "lr")
PARAMS = {"learning_rate": "0.01", "layers": "4", "optimizer": "adam"}
TAGS = {"team": "crash-tests", "phase": "train"}
CRASH_STEPS = 1700  # x 3 keys: 5,100 metrics
# Test 4: the metrics a child leaves behind at exit, more than the queue's capacity (500,000).
# Replaying them is bound by the server, about 5,700 to 6,400 metrics/s on a 2-core machine:
# 1,000,000 pass too but take about 3 minutes to replay (CRASH_TEST_EXIT_EVENTS=1000000).
EXIT_EVENTS = int(os.environ.get("CRASH_TEST_EXIT_EVENTS", "600000"))


def value_of(step: int, k: int) -> float:
    return step * 0.5 + k


# ---------------------------------------------------------------------------- helpers


class Gate:
    """A TCP relay to a real server on 127.0.0.1 that the test opens (forwarding), closes
    (nothing listens: connection refused) or turns into a black hole (connections accepted,
    requests read and never answered: they stay in flight). Reopening keeps the port, so the
    URL a child used (and its spool recorded) works again."""

    def __init__(self, target_port: int) -> None:
        self._target = (_HOST, target_port)
        self._cond = threading.Condition()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.mode = "closed"
        self.port = 0
        #: The first line of every request the black hole swallowed.
        self.swallowed: list[str] = []
        self.open()

    @property
    def url(self) -> str:
        return f"http://{_HOST}:{self.port}"

    def open(self, mode: str = "forward") -> None:
        with self._cond:
            self._cut()
            self.mode = mode
            if self._listener is None:
                listener = socket.create_server((_HOST, self.port))  # SO_REUSEADDR on POSIX
                self.port = listener.getsockname()[1]
                self._listener = listener
                threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def black_hole(self) -> None:
        self.open("black hole")

    def close(self) -> None:
        with self._cond:
            self._cut()
            self.mode = "closed"
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            listener.close()

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(cond, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def _cut(self) -> None:
        """Drop every connection (called with the condition held)."""
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            with self._cond:
                mode = self.mode
                if listener is not self._listener:
                    downstream.close()
                    return
                self._sockets.append(downstream)
            if mode == "forward":
                try:
                    upstream = socket.create_connection(self._target)
                except OSError:
                    downstream.close()
                    continue
                with self._cond:
                    self._sockets.append(upstream)
                for src, dst in ((downstream, upstream), (upstream, downstream)):
                    threading.Thread(target=pipe, args=(src, dst), daemon=True).start()
            else:
                threading.Thread(target=self._swallow, args=(downstream,), daemon=True).start()

    def _swallow(self, sock: socket.socket) -> None:
        head = b""
        recorded = False
        try:
            while data := sock.recv(65536):
                if not recorded:
                    head += data
                    if b"\r\n" in head:
                        recorded = True
                        with self._cond:
                            self.swallowed.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                            self._cond.notify_all()
        except OSError:
            pass


def child_env(tracking_uri: str, spool_root: Path, **extra: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "ASYNCTRACK_SPOOL_DIR": str(spool_root),
        "ASYNCTRACK_SPOOL_SYNC_INTERVAL": "0.2",
        "ASYNCTRACK_FLUSH_INTERVAL": "0.2",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m asynctrack.cli ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "asynctrack.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def status_rows(root: Path) -> dict[str, list[str]]:
    """``asynctrack status ROOT``: directory name -> [pid, host, state, segments, bytes,
    events]."""
    result = cli("status", str(root), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = line.split()
        if cells and (root / cells[0]).is_dir():
            rows[cells[0]] = cells[1:7]
    return rows


def writer_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_crash_run(client: MlflowClient, run_id: str, steps: int, status: str) -> None:
    """Every metric step exactly once per key, the params and tags, the status."""
    for k, key in enumerate(KEYS):
        assert history(client, run_id, key) == [(s, value_of(s, k)) for s in range(steps)], key
    run = client.get_run(run_id)
    assert run.data.params == PARAMS
    assert {k: run.data.tags.get(k) for k in TAGS} == TAGS
    assert run.info.status == status


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- child scripts

# argv: experiment, steps, artifact file ("" for none). Creates its run while the server is
# reachable, waits for the test to make it unreachable, logs, waits until everything is
# durable in the spool, says so, and waits to be killed.
_CRASH_SCRIPT = f"""
import json, os, sys, time
import asynctrack
from asynctrack import MLflowExperimentTracker

KEYS, PARAMS, TAGS = {KEYS!r}, {PARAMS!r}, {TAGS!r}
experiment, steps, artifact = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tracker = MLflowExperimentTracker(experiment_name=experiment)
with tracker.start_run(run_name="crash"):
    print("run", tracker.run_id, flush=True)
    sys.stdin.readline()  # the server is unreachable from here on
    tracker.log_params(PARAMS)
    tracker.set_tags(TAGS)
    events = len(PARAMS) + len(TAGS)
    if artifact:  # before the metrics: its upload starts before they fill every slot
        tracker.log_artifact(artifact)
        events += 1
    for step in range(steps):
        for k, key in enumerate(KEYS):
            tracker.log_metric(key, step * 0.5 + k, step=step)
    events += steps * len(KEYS)
    deadline = time.monotonic() + 60
    while asynctrack.stats().durable < events:  # polls observable state, with a deadline
        if time.monotonic() > deadline:
            print("stuck", json.dumps(asynctrack.stats().as_dict()), flush=True)
            os._exit(3)
        time.sleep(0.02)
    print("durable", events, json.dumps(asynctrack.stats().as_dict()), flush=True)
    sys.stdin.readline()  # the test SIGKILLs us here
    os._exit(4)  # the test went away without killing us: leave as a crash would
"""

# argv: experiment, steps stored, steps unsent. Logs and flushes the first steps (stored,
# and marked so in the spool), says so, waits for the test to turn the server into a black
# hole, logs the rest, waits until they are durable in the spool, and waits to be killed.
_PARTIAL_SCRIPT = f"""
import json, os, sys, time
import asynctrack
from asynctrack import MLflowExperimentTracker

KEYS, PARAMS, TAGS = {KEYS!r}, {PARAMS!r}, {TAGS!r}
experiment, stored, unsent = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tracker = MLflowExperimentTracker(experiment_name=experiment)
with tracker.start_run(run_name="partial"):
    tracker.log_params(PARAMS)
    tracker.set_tags(TAGS)
    for step in range(stored + unsent):
        if step == stored:
            tracker.flush()
            print("stored", tracker.run_id, json.dumps(asynctrack.stats().as_dict()), flush=True)
            sys.stdin.readline()  # the server accepts requests and never answers from here on
        for k, key in enumerate(KEYS):
            tracker.log_metric(key, step * 0.5 + k, step=step)
    events = len(PARAMS) + len(TAGS) + (stored + unsent) * len(KEYS)
    deadline = time.monotonic() + 60
    while asynctrack.stats().durable < events:  # polls observable state, with a deadline
        if time.monotonic() > deadline:
            print("stuck", json.dumps(asynctrack.stats().as_dict()), flush=True)
            os._exit(3)
        time.sleep(0.02)
    print("durable", json.dumps(asynctrack.stats().as_dict()), flush=True)
    sys.stdin.readline()  # the test SIGKILLs us here
    os._exit(4)
"""

# argv: experiment. Logs to a live server while the test runs `asynctrack sync`, flushing
# every 200 steps (which paces it), until told to stop; then ends its run normally.
_LIVE_SCRIPT = """
import sys, threading
from asynctrack import MLflowExperimentTracker

stop = threading.Event()
tracker = MLflowExperimentTracker(experiment_name=sys.argv[1])
with tracker.start_run(run_name="live"):
    print("run", tracker.run_id, flush=True)
    for step in range(200):
        tracker.log_metric("live", float(step), step=step)
    tracker.flush()
    step = 200
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("logging", flush=True)
    while not stop.is_set():
        for _ in range(200):
            tracker.log_metric("live", float(step), step=step)
            step += 1
        tracker.flush()
print("logged", step, flush=True)
"""

# argv: experiment, count. Logs `count` metrics to a server that went away, leaves its
# `with` block (the run end cannot be stored: FlushTimeoutError), and returns normally.
_EXIT_SCRIPT = """
import sys
import asynctrack
from asynctrack import MLflowExperimentTracker

experiment, count = sys.argv[1], int(sys.argv[2])
tracker = MLflowExperimentTracker(experiment_name=experiment)
try:
    with tracker.start_run(run_name="exit"):
        print("run", tracker.run_id, flush=True)
        sys.stdin.readline()  # the server is unreachable from here on
        log = tracker.log_metric
        for step in range(count):
            log("m", step * 0.25, step=step)
        print("logged", count, flush=True)
except asynctrack.FlushTimeoutError as exc:
    print("run-end", exc, flush=True)
print("returning", flush=True)
"""

# argv: experiment. A short run to a live server, with a spool that cannot be created.
_NO_SPOOL_SCRIPT = f"""
import json, sys
import asynctrack
from asynctrack import MLflowExperimentTracker

KEYS, PARAMS, TAGS = {KEYS!r}, {PARAMS!r}, {TAGS!r}
tracker = MLflowExperimentTracker(experiment_name=sys.argv[1])
with tracker.start_run(run_name="no-spool"):
    print("run", tracker.run_id, flush=True)
    tracker.log_params(PARAMS)
    tracker.set_tags(TAGS)
    for step in range(int(sys.argv[2])):
        for k, key in enumerate(KEYS):
            tracker.log_metric(key, step * 0.5 + k, step=step)
print("stats", json.dumps(asynctrack.stats().as_dict()), flush=True)
"""


def _crash(
    proc: Child, make_unreachable: Callable[[], None], events: int
) -> tuple[str, dict[str, Any]]:
    """Drive a _CRASH_SCRIPT child up to its "durable" line; return its run id and stats."""
    run_id = proc.expect("run")
    make_unreachable()
    proc.send("go")
    count, stats = proc.expect("durable").split(" ", 1)
    assert int(count) == events
    return run_id, json.loads(stats)


def _sync(root: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return cli("sync", str(root), *extra, timeout=timeout)


# ---------------------------------------------------------------------------- 1. SIGKILL


@pytest.mark.timeout(240)
def test_sigkill_mid_run_sync_stores_everything_once_and_fails_the_run(
    tmp_path: Path, experiment_name: str
) -> None:
    root = tmp_path / "spool"
    events = CRASH_STEPS * len(KEYS) + len(PARAMS) + len(TAGS)
    with MlflowServer(tmp_path / "server") as server:
        env = child_env(server.url, root)
        with child(_CRASH_SCRIPT, [experiment_name, str(CRASH_STEPS), ""], env) as proc:
            run_id, stats = _crash(proc, server.stop, events)
            # Nothing stored, everything durable in the spool.
            assert stats["sent"] == 0
            assert stats["durable"] >= events
            assert stats["spooled"] == events
            proc.kill()
            assert proc.proc.returncode == -signal.SIGKILL

        server.start()  # same port, same store
        client = MlflowClient(tracking_uri=server.url)
        for key in KEYS:
            assert client.get_metric_history(run_id, key) == []
        assert client.get_run(run_id).info.status == "RUNNING"

        [directory] = writer_dirs(root)
        row = status_rows(root)[directory.name]
        assert row[0] == str(proc.pid)
        assert row[2] == "dead"
        assert int(row[5]) == events

        result = _sync(root)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"stored {events} events, refused 0, 0 left" in result.stdout
        assert f"runs ended FAILED (their process died first): {run_id}" in result.stdout
        assert writer_dirs(root) == []

        assert_crash_run(client, run_id, CRASH_STEPS, "FAILED")


# ---------------------------------------------------------------------------- 2. upload


@pytest.mark.timeout(240)
def test_sigkill_during_artifact_upload_sync_uploads_the_file(
    tmp_path: Path, client: MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    root = tmp_path / "spool"
    staging = tmp_path / "staging"
    original = tmp_path / "weights.bin"
    original.write_bytes(os.urandom(2 * 1024 * 1024))
    digest = sha256(original)
    events = CRASH_STEPS * len(KEYS) + len(PARAMS) + len(TAGS) + 1
    gate = Gate(mlflow_server.port)
    try:
        env = child_env(gate.url, root, ASYNCTRACK_STAGING_DIR=str(staging))
        args = [experiment_name, str(CRASH_STEPS), str(original)]
        with child(_CRASH_SCRIPT, args, env) as proc:
            run_id, stats = _crash(proc, gate.black_hole, events)
            # The upload is in flight: its request reached the black hole, unanswered.
            gate.wait_for(
                lambda: any(
                    line.startswith("PUT ") and "mlflow-artifacts/artifacts/" in line
                    for line in gate.swallowed
                ),
                60,
                "the artifact upload's request",
            )
            assert stats["sent"] == 0
            assert stats["files_uploaded"] == 0 and stats["files_failed"] == 0
            assert stats["spooled"] == events
            proc.kill()
        staged = [p for p in staging.rglob("*") if p.is_file()]
        assert [p.name for p in staged] == [original.name]
        assert sha256(staged[0]) == digest

        gate.open()  # the server answers again, at the URL the spool recorded
        assert client.list_artifacts(run_id) == []
        row = status_rows(root)[writer_dirs(root)[0].name]
        assert (row[2], int(row[5])) == ("dead", events)

        result = _sync(root)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"stored {events} events, refused 0, 0 left" in result.stdout
        assert writer_dirs(root) == []
    finally:
        gate.close()

    assert_crash_run(client, run_id, CRASH_STEPS, "FAILED")
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path=original.name,
        dst_path=str(tmp_path / "download"),
        tracking_uri=mlflow_server.url,
    )
    assert sha256(Path(downloaded)) == digest
    # The replay removed the dead process's staged copy once it was stored.
    assert [p for p in staging.rglob("*") if p.is_file()] == []


_MODEL_CRASH_SCRIPT = """
import json, os, sys, time
import numpy as np
from sklearn.linear_model import LinearRegression
import asynctrack
from asynctrack import MLflowExperimentTracker

experiment, registered = sys.argv[1], sys.argv[2]
X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [3.0, 1.0]])
model = LinearRegression().fit(X, X @ [1.0, 2.0] + 3.0)
tracker = MLflowExperimentTracker(experiment_name=experiment)
with tracker.start_run(run_name="model-crash"):
    print("run", tracker.run_id, flush=True)
    sys.stdin.readline()  # the server is a black hole from here on
    tracker.log_param("alpha", "0.5")
    tracker.log_model(model, "regressor", registered_model_name=registered)
    deadline = time.monotonic() + 60
    while asynctrack.stats().durable < 2:  # the param and the model's record
        if time.monotonic() > deadline:
            print("stuck", json.dumps(asynctrack.stats().as_dict()), flush=True)
            os._exit(3)
        time.sleep(0.02)
    print("durable", 2, json.dumps(asynctrack.stats().as_dict()), flush=True)
    sys.stdin.readline()  # the test SIGKILLs us here
    os._exit(4)
"""


@pytest.mark.timeout(240)
def test_sigkill_before_log_model_is_done_sync_logs_and_registers_the_model(
    tmp_path: Path, client: MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    root, staging = tmp_path / "spool", tmp_path / "staging"
    registered = f"{experiment_name}-regressor"
    gate = Gate(mlflow_server.port)
    try:
        env = child_env(gate.url, root, ASYNCTRACK_STAGING_DIR=str(staging))
        with child(_MODEL_CRASH_SCRIPT, [experiment_name, registered], env) as proc:
            run_id, stats = _crash(proc, gate.black_hole, 2)
            assert stats["sent"] == 0
            proc.kill()
        assert [p.name for p in staging.rglob("MLmodel")] == ["MLmodel"]  # staged, kept
        gate.open()
        experiment_id = client.get_run(run_id).info.experiment_id
        assert client.search_logged_models([experiment_id]) == []

        result = _sync(root)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "stored 2 events, refused 0, 0 left" in result.stdout
        assert writer_dirs(root) == []
    finally:
        gate.close()

    [logged] = client.search_logged_models([experiment_id])
    assert (logged.name, logged.source_run_id, str(logged.status)) == ("regressor", run_id, "READY")
    assert logged.params == {"alpha": "0.5"}
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    assert client.get_model_version(registered, "1").source == f"models:/{logged.model_id}"
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{logged.model_id}",
        dst_path=str(tmp_path / "download"),
        tracking_uri=mlflow_server.url,
    )
    loaded = mlflow.sklearn.load_model(local)
    assert loaded.predict([[1.0, 1.0]]).tolist() == pytest.approx([6.0])
    assert list(staging.rglob("MLmodel")) == []  # the replay removed the staged copy


# ---------------------------------------------------------------------------- 3. sync twice


@pytest.mark.timeout(240)
def test_sync_twice_and_while_another_process_logs(
    tmp_path: Path, client: MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    root = tmp_path / "spool"
    events = CRASH_STEPS * len(KEYS) + len(PARAMS) + len(TAGS)
    gate = Gate(mlflow_server.port)
    try:
        env = child_env(gate.url, root)
        with child(_CRASH_SCRIPT, [experiment_name, str(CRASH_STEPS), ""], env) as dead:
            dead_run, stats = _crash(dead, gate.close, events)
            assert stats["sent"] == 0
            dead.kill()
        gate.open()
        [dead_dir] = writer_dirs(root)

        live_env = child_env(mlflow_server.url, root)
        with child(_LIVE_SCRIPT, [experiment_name], live_env) as live:
            live_run = live.expect("run")
            live.expect("logging")  # its engine (and spool) started after the crash
            [live_dir] = [d for d in writer_dirs(root) if d != dead_dir]
            rows = status_rows(root)
            assert rows[dead_dir.name][2] == "dead"
            assert int(rows[dead_dir.name][5]) == events
            assert rows[live_dir.name][2] == "writing"

            first = _sync(root)
            assert first.returncode == 0, first.stdout + first.stderr
            assert f"stored {events} events, refused 0, 0 left" in first.stdout
            assert f"runs ended FAILED (their process died first): {dead_run}" in first.stdout
            skipped = f"skipped: {live_dir}: in use by pid {live.pid}"
            assert skipped in first.stdout
            assert writer_dirs(root) == [live_dir]
            assert_crash_run(client, dead_run, CRASH_STEPS, "FAILED")
            before = {key: history(client, dead_run, key) for key in KEYS}

            second = _sync(root)  # nothing of the dead process is left; the live one skipped
            assert second.returncode == 0, second.stdout + second.stderr
            assert "stored 0 events, refused 0, 0 left" in second.stdout
            assert skipped in second.stdout
            assert {key: history(client, dead_run, key) for key in KEYS} == before
            assert client.get_run(live_run).info.status == "RUNNING"

            live.send("stop")
            logged = int(live.expect("logged"))
            assert live.wait(60) == 0, live.stderr
        # The next process said it found the dead one's spool, and how to send it.
        assert "left by processes that ended" in live.stderr
        assert f"asynctrack sync {root}" in live.stderr
        assert "could not be stored" not in live.stderr
        # The live process stored all its own events and removed its directory.
        assert writer_dirs(root) == []
        assert history(client, live_run, "live") == [(s, float(s)) for s in range(logged)]
        assert client.get_run(live_run).info.status == "FINISHED"

        third = _sync(root)
        assert third.returncode == 0, third.stdout + third.stderr
        assert f"nothing waiting in {root}" in third.stdout
    finally:
        gate.close()
    assert_crash_run(client, dead_run, CRASH_STEPS, "FAILED")
    assert history(client, live_run, "live") == [(s, float(s)) for s in range(logged)]


# ---------------------------------------------------------------------------- 4. exit


def _metric_rows(db: Path, run_id: str, key: str) -> tuple[int, int, int, int, float]:
    """count, distinct steps, min step, max step, sum of values, from the server's store."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT step), MIN(step), MAX(step), SUM(value) "
            "FROM metrics WHERE run_uuid = ? AND key = ?",
            (run_id, key),
        ).fetchone()
    return tuple(row)


@pytest.mark.timeout(600)
def test_exit_with_server_unreachable_keeps_every_event_for_sync(
    tmp_path: Path, client: MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    root = tmp_path / "spool"
    count = EXIT_EVENTS
    gate = Gate(mlflow_server.port)
    try:
        env = child_env(
            gate.url,
            root,
            ASYNCTRACK_EXIT_TIMEOUT="3",
            ASYNCTRACK_FLUSH_TIMEOUT="1",
            ASYNCTRACK_SPOOL_SYNC_INTERVAL="1",
            ASYNCTRACK_FLUSH_INTERVAL="1",
        )
        with child(_EXIT_SCRIPT, [experiment_name, str(count)], env) as proc:
            run_id = proc.expect("run")
            gate.close()
            proc.send("go")
            assert proc.expect("logged") == str(count)
            run_end = proc.expect("run-end")
            proc.expect("returning")
            code = proc.wait(60)  # a hang is the failure
            err = proc.stderr
        assert code == 0, err
        assert "flush timed out after 1" in run_end
        [directory] = writer_dirs(root)
        # the metrics and the run's end
        left = count + 1
        assert f"asynctrack: {left} event(s) could not be stored at {gate.url}" in err, err
        assert f"{left} of them are kept in the spool {directory}" in err, err
        assert f"`asynctrack sync {directory}`" in err, err
        row = status_rows(root)[directory.name]
        assert (row[0], row[2], int(row[5])) == (str(proc.pid), "dead", left)

        gate.open()
        started = time.monotonic()
        result = _sync(root, timeout=480)
        took = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"stored {left} events, refused 0, 0 left" in result.stdout
        assert writer_dirs(root) == []
    finally:
        gate.close()
    db = mlflow_server.workdir / "mlflow.db"
    total = sum(step * 0.25 for step in range(count))
    assert _metric_rows(db, run_id, "m") == (count, count, 0, count - 1, total)
    # The run's end was spooled with the rest: the run ends as its block did.
    assert client.get_run(run_id).info.status == "FINISHED"
    print(f"sync of {left} events took {took:.1f} s")


@pytest.mark.timeout(120)
def test_exit_with_server_unreachable_prints_only_asynctrack_message(
    tmp_path: Path, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    count = 10_000  # ten batches: more than max_in_flight (4) stuck retrying
    gate = Gate(mlflow_server.port)
    try:
        env = child_env(
            gate.url, tmp_path / "spool", ASYNCTRACK_EXIT_TIMEOUT="2", ASYNCTRACK_FLUSH_TIMEOUT="1"
        )
        with child(_EXIT_SCRIPT, [experiment_name, str(count)], env) as proc:
            proc.expect("run")
            gate.close()
            proc.send("go")
            proc.expect("returning")
            code = proc.wait(60)
            err = proc.stderr
    finally:
        gate.close()
    assert code == 0, err
    assert f"asynctrack: {count + 1} event(s) could not be stored" in err, err
    # What the user reads at exit: asynctrack's count and command, not Python's complaints
    # about the worker's event loop.
    assert "never awaited" not in err, err
    assert "Task was destroyed but it is pending" not in err, err


# ---------------------------------------------------------------------------- 5. no spool


@pytest.mark.timeout(120)
def test_unusable_spool_directory_warns_and_still_delivers(
    tmp_path: Path, client: MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    steps = 500
    if os.geteuid() == 0:  # root writes anywhere: a regular file cannot hold a spool either
        root = tmp_path / "spool-is-a-file"
        root.write_text("not a directory\n")
    else:
        root = tmp_path / "read-only-spool"
        root.mkdir()
        root.chmod(0o500)
    try:
        env = child_env(mlflow_server.url, root)
        with child(_NO_SPOOL_SCRIPT, [experiment_name, str(steps)], env) as proc:
            run_id = proc.expect("run")
            stats = json.loads(proc.expect("stats"))
            code = proc.wait(60)
            err = proc.stderr
    finally:
        if root.is_dir():
            root.chmod(0o700)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "cannot create a spool" in line]
    assert len(warnings) == 1, err
    assert str(root) in warnings[0]
    assert "could not be stored" not in err
    assert (stats["queued"], stats["spooled"], stats["spool_bytes"]) == (0, 0, 0)
    if root.is_dir():
        assert list(root.iterdir()) == []
    else:
        assert root.read_text() == "not a directory\n"
    assert_crash_run(client, run_id, steps, "FINISHED")


# ---------------------------------------------------------------------------- 6. only unsent


@pytest.mark.timeout(240)
def test_sigkill_after_part_was_stored_status_and_sync_count_only_the_rest(
    tmp_path: Path, client: MlflowClient, mlflow_server: MlflowServer, experiment_name: str
) -> None:
    stored, unsent = 1000, 334
    root = tmp_path / "spool"
    gate = Gate(mlflow_server.port)
    try:
        env = child_env(gate.url, root)
        args = [experiment_name, str(stored), str(unsent)]
        with child(_PARTIAL_SCRIPT, args, env) as proc:
            run_id, stats = proc.expect("stored").split(" ", 1)
            assert json.loads(stats)["sent"] == stored * len(KEYS) + len(PARAMS) + len(TAGS)
            gate.black_hole()  # what follows reaches the server, which never answers
            proc.send("go")
            stats = json.loads(proc.expect("durable"))
            assert stats["sent"] == stored * len(KEYS) + len(PARAMS) + len(TAGS)
            proc.kill()
        gate.open()
        [directory] = writer_dirs(root)
        # The spool holds the whole run, but says which records the server has.
        row = status_rows(root)[directory.name]
        assert (row[2], int(row[5])) == ("dead", unsent * len(KEYS))

        result = _sync(root)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"stored {unsent * len(KEYS)} events, refused 0, 0 left" in result.stdout
        assert f"runs ended FAILED (their process died first): {run_id}" in result.stdout
        assert writer_dirs(root) == []
    finally:
        gate.close()
    assert_crash_run(client, run_id, stored + unsent, "FAILED")
    db = mlflow_server.workdir / "mlflow.db"
    steps = stored + unsent
    for k, key in enumerate(KEYS):
        total = sum(value_of(step, k) for step in range(steps))
        assert _metric_rows(db, run_id, key) == (steps, steps, 0, steps - 1, total)
