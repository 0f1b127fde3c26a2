"""What MLflow's basic-auth app costs: caller and end to end, with and without credentials.

Run by hand: ``python benchmarks/bench_auth.py``. It starts two MLflow servers on
127.0.0.1, one worker each (sqlite store): a plain one, and one running MLflow's basic-auth
app (``MlflowAuthServer``, which checks the password on every request as MLflow ships it).
A user logs through a tracker with ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` to the second.

- caller cost of ``tracker.log_metric`` (``bench_core.per_call_us``: median of rounds, the
  worker draining between rounds, untimed);
- end to end: 50,000 points from the first call until flushed, rounds interleaved.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
from bench_core import per_call_us

from asynctrack import MLflowExperimentTracker
from asynctrack.testing import MlflowAuthServer, MlflowServer

CALLS = 50_000
POINTS = 50_000
ROUNDS = 3
USER, PASSWORD = "bench-user", "bench-password-0123"


def caller_us(tracker: MLflowExperimentTracker) -> float:
    with tracker.start_run(run_name="caller-cost"):
        log_metric = tracker.log_metric

        def loop(n: int) -> None:
            for i in range(n):
                log_metric("loss", 0.5, step=i)

        cost = per_call_us(loop, CALLS, settle=lambda: tracker.flush(600))
        tracker.flush(600)
    return cost


def end_to_end_s(tracker: MLflowExperimentTracker) -> float:
    with tracker.start_run(run_name="end-to-end"):
        start = time.perf_counter()
        for i in range(POINTS):
            tracker.log_metric("e2e", float(i), step=i)
        tracker.flush(600)
        return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plain = MlflowServer(Path(tmp) / "plain")
        auth = MlflowAuthServer(Path(tmp) / "auth")
        with plain, auth:
            auth.create_user(USER, PASSWORD)
            print(f"MLflow {mlflow.__version__}, servers with 1 worker: {plain.url}, {auth.url}")
            # Each engine resolves its credentials when it starts: the plain one first,
            # with none set, then the one for the auth server with the user's.
            trackers = {"no auth": MLflowExperimentTracker("bench", tracking_uri=plain.url)}
            costs = {"no auth": caller_us(trackers["no auth"])}
            os.environ["MLFLOW_TRACKING_USERNAME"] = USER
            os.environ["MLFLOW_TRACKING_PASSWORD"] = PASSWORD
            trackers["basic auth"] = MLflowExperimentTracker("bench", tracking_uri=auth.url)
            costs["basic auth"] = caller_us(trackers["basic auth"])
            seconds: dict[str, list[float]] = {name: [] for name in trackers}
            for _ in range(ROUNDS):
                for name, tracker in trackers.items():
                    seconds[name].append(end_to_end_s(tracker))
    print(f"{'':<12}{'log_metric us':>15}{'50,000 points, s (rounds)':>40}")
    for name in trackers:
        rounds = ", ".join(f"{s:.1f}" for s in seconds[name])
        median = statistics.median(seconds[name])
        print(f"{name:<12}{costs[name]:>15.2f}{f'{median:.1f} ({rounds})':>40}")
    ratio = statistics.median(seconds["basic auth"]) / statistics.median(seconds["no auth"])
    print(f"end to end with auth / without: {ratio:.1f}x")


if __name__ == "__main__":
    main()
