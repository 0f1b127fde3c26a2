"""The drop-in on a local sqlite store and over HTTP, beside plain MLflow on the same store.

Run by hand: ``python benchmarks/bench_dropin_stores.py``. For each store it measures the
caller's cost of ``mlflow.log_metric`` (plain MLflow: 300 calls, it writes each one; under
``asynctrack.patch_mlflow()``: 200,000 calls, median of rounds, as ``bench_core.py``
measures) and the time ``mlflow.end_run()`` takes after 10,000 metrics (plain: written
already, so only the end; patched: the end waits until every queued metric is stored).
The HTTP server is started here (sqlite behind it, one worker) and stopped at the end.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow

sys.path.insert(0, str(Path(__file__).parent))

from bench_core import per_call_us

import asynctrack
from asynctrack.testing import MlflowServer

PATCHED_CALLS = int(os.environ.get("BENCH_CALLS", 200_000))
PLAIN_CALLS = 300
END_AFTER = 10_000


def plain_cost(calls: int) -> float:
    samples = []
    with mlflow.start_run(run_name="plain-cost"):
        for i in range(calls):
            start = time.perf_counter()
            mlflow.log_metric("m", float(i), step=i)
            samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def end_time(patched: bool) -> float:
    """Seconds ``end_run`` takes after END_AFTER metrics."""
    with asynctrack.patch_mlflow(quiet=True) if patched else _nothing():
        mlflow.start_run(run_name=f"end-{'patched' if patched else 'plain'}")
        for i in range(END_AFTER if patched else 100):  # plain writes each: 100 is plenty
            mlflow.log_metric("m", float(i), step=i)
        start = time.perf_counter()
        mlflow.end_run()
        return time.perf_counter() - start


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def measure(uri: str) -> dict[str, float]:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-dropin-stores")
    results = {"plain log_metric us": plain_cost(PLAIN_CALLS)}
    with asynctrack.patch_mlflow(quiet=True), mlflow.start_run(run_name="patched-cost"):
        log_metric = mlflow.log_metric

        def loop(n: int) -> None:
            for i in range(n):
                log_metric("m", 0.5, step=i)

        results["patched log_metric us"] = per_call_us(
            loop, PATCHED_CALLS, settle=lambda: asynctrack.flush(600)
        )
    results["plain end_run s"] = end_time(patched=False)
    results["patched end_run s (after 10k metrics)"] = end_time(patched=True)
    return results


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"sqlite file": f"sqlite:///{tmp}/local.db"}
        with MlflowServer(Path(tmp) / "server") as server:
            stores["http (sqlite behind)"] = server.url
            table = {name: measure(uri) for name, uri in stores.items()}
    rows = sorted({k for r in table.values() for k in r})
    width = max(map(len, rows))
    print(f"{'':{width}}  " + "  ".join(f"{n:>22}" for n in table))
    for row in rows:
        print(f"{row:{width}}  " + "  ".join(f"{table[n][row]:>22,.3f}" for n in table))


if __name__ == "__main__":
    main()
