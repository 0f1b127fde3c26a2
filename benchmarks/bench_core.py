"""Core benchmark: asynctrack vs MLflow's own logging, against one real server.

Run by hand: ``python benchmarks/bench_core.py``. It starts an MLflow server (sqlite store,
4 uvicorn workers as MLflow's default) on 127.0.0.1, measures, prints a table, stops it.

- caller cost: wall time of a tight loop divided by the calls, with the worker running as
  it normally does (its CPU shares the GIL with the loop, so it is part of the cost);
  median of several rounds;
- end to end: metrics/s from the first call until flushed;
- a training-like loop (about 1 ms of numpy work and 10 metrics a step) against the same
  loop without logging;
- memory per buffered metric (tracemalloc, with the sender held back);
- the spool: caller cost and loop slowdown with it off (it is on by default), its bytes
  per metric and how fast the worker writes it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric

import asynctrack
from asynctrack import MLflowExperimentTracker
from asynctrack._engine import spool
from asynctrack._engine.engine import Engine
from asynctrack._engine.intake import Intake
from asynctrack._engine.queue import EventQueue
from asynctrack._runs import Run
from asynctrack.config import EngineConfig
from asynctrack.testing import MlflowServer

ROUNDS = 3


def _nothing() -> None:
    return None


CALLS = 200_000


def per_call_us(
    fn: Callable[[int], object],
    calls: int,
    rounds: int = ROUNDS,
    settle: Callable[[], None] = lambda: None,
) -> float:
    """Median cost of one call over ``rounds`` loops; ``settle`` (untimed) drains between."""
    samples = []
    for _ in range(rounds):
        settle()
        start = time.perf_counter()
        fn(calls)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def _spool_off_uri(server_url: str) -> str:
    """The same server under another name, so it gets its own engine, without a spool."""
    return server_url.replace("127.0.0.1", "localhost")


def bench_spool(experiment: str, server_url: str, results: dict[str, float]) -> None:
    """Caller cost with the spool off (the default engine has it on), the spool's size per
    metric, and how fast the worker's intake writes it (encoding, writes and an fsync)."""
    tracker = MLflowExperimentTracker(experiment, tracking_uri=_spool_off_uri(server_url))
    with tracker.start_run(run_name="asynctrack-caller-cost-spool-off"):
        log_metric = tracker.log_metric

        def metric_loop(n: int) -> None:
            for i in range(n):
                log_metric("loss", 0.5, step=i)

        results["asynctrack log_metric us, spool off"] = per_call_us(
            metric_loop, CALLS, settle=lambda: tracker.flush(600)
        )
        tracker.flush(600)

    run_id, now = "0123456789abcdef0123456789abcdef", time.time()
    metrics = [(run_id, f"metric_{i % 10}", 0.1 * i, now + i / 1e4, i) for i in range(1_000_000)]
    results["spool bytes per metric"] = len(spool.encode(metrics[:256])) / 256
    with tempfile.TemporaryDirectory() as tmp:
        writer = spool.Writer(Path(tmp), "bench://", 8 * 1024 * 1024, 2**40)
        queue = EventQueue(
            EngineConfig(queue_capacity=len(metrics)), _nothing, _nothing, _nothing, str
        )
        queue.open = True
        for metric in metrics:
            queue.put(metric)
        intake = Intake(queue, writer, window=0)
        start = time.perf_counter()
        intake.pull(everything=True)
        intake.sync()
        results["spool write rate, metrics/s"] = len(metrics) / (time.perf_counter() - start)
        writer.close(empty=True)


def bench_asynctrack(experiment: str, results: dict[str, float]) -> None:
    tracker = MLflowExperimentTracker(experiment_name=experiment)
    with tracker.start_run(run_name="asynctrack-caller-cost"):
        log_metric, log_metrics, set_tag = tracker.log_metric, tracker.log_metrics, tracker.set_tag

        def metric_loop(n: int) -> None:
            for i in range(n):
                log_metric("loss", 0.5, step=i)

        def metrics_loop(n: int) -> None:
            values = {f"m{k}": 0.1 * k for k in range(10)}
            for i in range(n):
                log_metrics(values, step=i)

        def tag_loop(n: int) -> None:
            for i in range(n):
                set_tag("phase", i)

        def settle() -> None:
            tracker.flush(600)

        results["asynctrack log_metric us"] = per_call_us(metric_loop, CALLS, settle=settle)
        results["asynctrack log_metrics(10) us"] = per_call_us(metrics_loop, 10_000, settle=settle)
        results["asynctrack set_tag us"] = per_call_us(tag_loop, CALLS, settle=settle)
        settle()

    with tracker.start_run(run_name="asynctrack-end-to-end"):
        n = 100_000
        start = time.perf_counter()
        for i in range(n):
            tracker.log_metric("e2e", float(i), step=i)
        tracker.flush(600)
        results["asynctrack end-to-end metrics/s"] = n / (time.perf_counter() - start)


def bench_raw_log_batch(
    client: mlflow.MlflowClient, run_id: str, results: dict[str, float]
) -> None:
    """Full log_batch calls through MlflowClient, shaped like the end-to-end test's data
    (one key, increasing steps, a timestamp per metric)."""
    now = int(time.time() * 1000)

    def batches(key: str) -> list[list[Metric]]:
        return [
            [Metric(key, float(i), now + i // 10, i) for i in range(b * 1000, (b + 1) * 1000)]
            for b in range(20)
        ]

    one, four = batches("raw1"), batches("raw4")
    start = time.perf_counter()
    for batch in one:
        client.log_batch(run_id, metrics=batch, synchronous=True)
    results["raw log_batch, 1 stream, metrics/s"] = 20_000 / (time.perf_counter() - start)
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda b: client.log_batch(run_id, metrics=b, synchronous=True), four))
    results["raw log_batch, 4 in flight, metrics/s"] = 20_000 / (time.perf_counter() - start)


def bench_mlflow(experiment: str, results: dict[str, float]) -> None:
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="mlflow-sync"):
        results["mlflow log_metric sync us"] = per_call_us(
            lambda n: [mlflow.log_metric("loss", 0.5, step=i) for i in range(n)], 100, rounds=1
        )
        results["mlflow set_tag sync us"] = per_call_us(
            lambda n: [mlflow.set_tag("phase", i) for i in range(n)], 50, rounds=1
        )
    with mlflow.start_run(run_name="mlflow-async") as run:
        n = 2000
        start = time.perf_counter()
        ops = [mlflow.log_metric("loss", float(i), step=i, synchronous=False) for i in range(n)]
        caller = time.perf_counter() - start
        results["mlflow log_metric synchronous=False us"] = caller / n * 1e6
        for op in ops:
            assert op is not None
            op.wait()
        results["mlflow async end-to-end metrics/s"] = n / (time.perf_counter() - start)
        values = {f"m{k}": 0.1 * k for k in range(10)}
        start = time.perf_counter()
        ops = [mlflow.log_metrics(values, step=i, synchronous=False) for i in range(200)]
        results["mlflow log_metrics(10) synchronous=False us"] = (
            (time.perf_counter() - start) / 200 * 1e6
        )
        for op in ops:
            assert op is not None
            op.wait()
        bench_raw_log_batch(mlflow.MlflowClient(), run.info.run_id, results)


def bench_training_loop(
    experiment: str, server_url: str, server_pid: int, results: dict[str, float]
) -> None:
    """About 1 ms of numpy work and 10 metrics a step, with and without logging.

    BLAS runs on one thread: the step stands for work that leaves a core free (a GPU step,
    or a data loader on the other core); BLAS threads spinning on both of this machine's
    two cores would measure their contention with the server, not the logging.
    """
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    size = 100
    rng = np.random.default_rng(0)
    with threadpool_limits(1):
        while True:  # calibrate the matrix to about 1 ms a product
            a = rng.random((size, size))
            start = time.perf_counter()
            for _ in range(50):
                a @ a
            if (time.perf_counter() - start) / 50 >= 1e-3 or size > 2000:
                break
            size += 20
        steps = 3000

        def loop(log: Callable[[dict[str, float], int], None] | None) -> float:
            start = time.perf_counter()
            for step in range(steps):
                loss = float((a @ a)[0, 0])  # GIL released during the product
                if log is not None:
                    log({f"metric_{k}": loss + k for k in range(10)}, step)
            return time.perf_counter() - start

        loop(None)  # warm up
        tracker = MLflowExperimentTracker(experiment_name=experiment)
        no_spool = MLflowExperimentTracker(experiment, tracking_uri=_spool_off_uri(server_url))
        for label, pin, logger in (
            ("", False, tracker),
            (", server on its own core", True, tracker),
            (", server on its own core, spool off", True, no_spool),
        ):
            base, logged = [], []
            with logger.start_run(run_name="training-loop" + label), _pinned(server_pid, pin):
                for _ in range(5):
                    base.append(loop(None))
                    logged.append(loop(logger.log_metrics))
                    logger.flush(600)
            b, t = statistics.median(base), statistics.median(logged)
            results[f"training loop step ms (no logging){label}"] = b / steps * 1e3
            results[f"training loop slowdown %{label}"] = (t - b) / b * 100

        # What the server alone takes from the loop when it shares the cores: no logging
        # here, while another process sends the server the same metrics at the same rate.
        step_s = results["training loop step ms (no logging)"] / 1e3
        with tracker.start_run(run_name="server-load"):
            run_id = tracker.run_id
            assert run_id is not None
            base, loaded = [], []
            for _ in range(5):
                base.append(loop(None))
                with _server_load(server_url, run_id, calls_per_s=10 / 1000 / step_s):
                    loaded.append(loop(None))
        b, t = statistics.median(base), statistics.median(loaded)
        results["training loop slowdown %, server load alone (no logging here)"] = (t - b) / b * 100


# Sends full 1000-metric log_batch bodies at a fixed rate, 4 in flight, with next to no CPU
# of its own (pre-encoded bodies over http.client).
_LOAD = r"""
import http.client, sys, threading, time
from urllib.parse import urlsplit
url, run_id, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
ready = threading.Barrier(5)
def body(k, n):
    ms = ",".join(
        f'{{"key":"load_{i % 10}","value":{i}.0,"timestamp":{int(time.time() * 1000)},'
        f'"step":{(k * 10**7) + n * 1000 + i}}}' for i in range(1000)
    )
    return f'{{"run_id":"{run_id}","metrics":[{ms}]}}'.encode()
def sender(k):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    bodies = [body(k, n) for n in range(200)]
    ready.wait()
    start = time.monotonic()
    for n, b in enumerate(bodies):
        time.sleep(max(0.0, start + n * 4 / rate - time.monotonic()))
        conn.request("POST", "/api/2.0/mlflow/runs/log-batch", b,
                     {"Content-Type": "application/json"})
        conn.getresponse().read()
for k in range(4):
    threading.Thread(target=sender, args=(k,), daemon=True).start()
ready.wait()
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _server_load(url: str, run_id: str, calls_per_s: float) -> Iterator[None]:
    load = subprocess.Popen(
        [sys.executable, "-c", _LOAD, url, run_id, str(calls_per_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert load.stdout is not None and load.stdin is not None
    try:
        assert load.stdout.readline().strip() == "ready"
        yield
    finally:
        load.kill()
        load.wait()


@contextlib.contextmanager
def _pinned(server_pid: int, pin: bool) -> Iterator[None]:
    """Put the server's processes on the last core and this process on the others.

    On this two-core machine the server ingesting 10k metrics/s would otherwise take CPU
    from the loop, which a server on its own host would not; pinned, the slowdown left is
    what the client itself costs (its worker included, which stays on the loop's core).
    """
    if not pin or not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        yield
        return
    cpus = sorted(os.sched_getaffinity(0))
    # Affinity is per thread: every thread of every server process, and of this one.
    server = [t for pid in (server_pid, *_children(server_pid)) for t in _threads(pid)]
    here = _threads(os.getpid())
    for tid in server:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus[-1:])
    for tid in here:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus[:-1])
    try:
        yield
    finally:
        for tid in server + here:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def _threads(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    return []


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(entry, "stat").read_text().split()[3] == str(pid):
                    found.append(int(entry.name))
                    found.extend(_children(int(entry.name)))
    return found


def bench_memory(results: dict[str, float]) -> None:
    hold = threading.Event()

    class Held:
        def log_batch(self, *args: object) -> None:
            hold.wait()

        def end_run(self, *args: object) -> None:
            pass

    engine = Engine(
        "bench://memory", EngineConfig(flush_interval=3600, spool=False), lambda u, t: Held()
    )
    run = Run("0" * 32, "0", "bench://memory", "", engine, None)
    tracker = MLflowExperimentTracker()
    tracker._run_var.set(run)
    n = 200_000
    tracker.log_metric("warmup", 1.0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        tracker.log_metric("loss", float(i), step=i)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    results["memory per buffered metric, bytes"] = used / n
    hold.set()


def main() -> None:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, MlflowServer(Path(tmp), workers=4) as server:
        mlflow.set_tracking_uri(server.url)
        print(
            f"MLflow {mlflow.__version__} server at {server.url}, python {sys.version.split()[0]}"
        )
        asynctrack.configure_engine(_spool_off_uri(server.url), spool=False)
        bench_asynctrack("bench-asynctrack", results)
        bench_spool("bench-asynctrack", server.url, results)
        assert server.pid is not None
        bench_training_loop("bench-loop", server.url, server.pid, results)
        bench_mlflow("bench-mlflow", results)
        bench_memory(results)
        asynctrack.flush(600)
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:>12,.2f}")
    at, sync_off = (
        results["asynctrack log_metric us"],
        results["mlflow log_metric synchronous=False us"],
    )
    raw4 = results["raw log_batch, 4 in flight, metrics/s"]
    print(f"{'asynctrack vs synchronous=False':<{width}}  {sync_off / at:>11,.0f}x cheaper")
    print(
        f"{'asynctrack end-to-end / raw 4 in flight':<{width}}  "
        f"{results['asynctrack end-to-end metrics/s'] / raw4 * 100:>11,.0f}%"
    )


if __name__ == "__main__":
    main()
