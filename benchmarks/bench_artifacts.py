"""Artifact benchmark: asynctrack vs MLflow's own uploads, to S3 (moto) in direct mode.

Run by hand: ``python benchmarks/bench_artifacts.py``. It starts moto's S3 server and an
MLflow server (``--default-artifact-root s3://bench/ --no-serve-artifacts``) as
subprocesses on 127.0.0.1, so their memory and CPU are not this process's, then measures
in this one process:

- 200 files of 256 KiB: ``mlflow.log_artifacts`` vs ``tracker.log_artifacts``;
- one file of 128 MiB: ``mlflow.log_artifact`` vs ``tracker.log_artifact``;

MLflow is measured as it comes (boto3 adds a CRC32 to every request, streamed as a trailer)
and as ``mlflow*``, with checksums only where S3 requires them (``when_required``), the
setting asynctrack's client uses; asynctrack sends a multipart part's CRC32 as a plain
header of its own (``multipart_checksums``);

each as the time the caller is blocked, the time until stored (asynctrack: until
``flush()`` returns) and the peak growth of this process's resident memory while it runs
(sampled every millisecond). Each figure is the median of a few interleaved rounds, after
a warm-up that loads both S3 clients; the bucket is emptied between rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow

from asynctrack import MLflowExperimentTracker
from asynctrack.testing import MlflowServer, free_port

MiB = 1024 * 1024
BUCKET = "bench"
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (workdir / "moto.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


class PeakRss:
    """Peak growth of this process's resident set while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakRss:
        self._base = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss() - self._base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self._base)


Measure = tuple[float, float, int]  # blocked s, stored s, peak RSS growth in bytes


def measure(call: Callable[[], None], settle: Callable[[], None]) -> Measure:
    with PeakRss() as memory:
        start = time.perf_counter()
        call()
        blocked = time.perf_counter() - start
        settle()
        stored = time.perf_counter() - start
    return blocked, stored, memory.peak


def with_mlflow(experiment: str, call: Callable[[], None]) -> Measure:
    mlflow.set_experiment(experiment)
    with mlflow.start_run():
        result = measure(call, lambda: None)
    empty_bucket()
    return result


def with_mlflow_when_required(experiment: str, call: Callable[[], None]) -> Measure:
    """MLflow with the client setting asynctrack uses for MinIO's sake: no CRC32 per
    request. (moto then copies the whole object and computes its CRC when a multipart upload
    completes.)"""
    from mlflow.store.artifact import s3_artifact_repo

    os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
    s3_artifact_repo._cached_get_s3_client.cache_clear()  # a client with the setting
    try:
        return with_mlflow(experiment, call)
    finally:
        del os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"]
        s3_artifact_repo._cached_get_s3_client.cache_clear()


def with_asynctrack(tracker: MLflowExperimentTracker, call: Callable[[], None]) -> Measure:
    with tracker.start_run():
        result = measure(call, tracker.flush)
    empty_bucket()
    return result


def empty_bucket() -> None:
    """moto keeps every object in its memory; start each round from an empty bucket, so
    later rounds (and whichever client goes second) do not pay for earlier ones."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=item["Key"])


def median(samples: list[Measure]) -> Measure:
    return (
        statistics.median(s[0] for s in samples),
        statistics.median(s[1] for s in samples),
        int(statistics.median(s[2] for s in samples)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with moto_server(tmp) as s3_url:
            os.environ.update(ENV, MLFLOW_S3_ENDPOINT_URL=s3_url)
            import boto3

            boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket=BUCKET)
            root = ["--default-artifact-root", f"s3://{BUCKET}/", "--no-serve-artifacts"]
            with MlflowServer(tmp / "mlflow", root, env=os.environ.copy()) as server:
                mlflow.set_tracking_uri(server.url)
                run_all(tmp, server.url, args.rounds)


def run_all(tmp: Path, url: str, rounds: int) -> None:
    small = tmp / "small"
    small.mkdir()
    for i in range(200):
        (small / f"file-{i:03d}.bin").write_bytes(os.urandom(256 * 1024))
    big = tmp / "big.bin"
    with big.open("wb") as f:
        for _ in range(128):
            f.write(os.urandom(MiB))
    warm = tmp / "warm.txt"
    warm.write_text("warm-up")
    tracker = MLflowExperimentTracker(experiment_name="bench-asynctrack", tracking_uri=url)
    with_mlflow("bench-mlflow", lambda: mlflow.log_artifact(str(warm)))
    with_asynctrack(tracker, lambda: tracker.log_artifact(warm))

    results: dict[str, dict[str, Measure]] = {}
    cases: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "200 files x 256 KiB": (
            lambda: mlflow.log_artifacts(str(small)),
            lambda: tracker.log_artifacts(small),
        ),
        "1 file x 128 MiB": (
            lambda: mlflow.log_artifact(str(big)),
            lambda: tracker.log_artifact(big),
        ),
    }
    for name, (theirs, ours) in cases.items():
        samples: dict[str, list[Measure]] = {"mlflow": [], "mlflow*": [], "asynctrack": []}
        for _ in range(rounds):  # interleaved, so drift on a shared machine hits all
            samples["mlflow"].append(with_mlflow("bench-mlflow", theirs))
            samples["mlflow*"].append(with_mlflow_when_required("bench-mlflow", theirs))
            samples["asynctrack"].append(with_asynctrack(tracker, ours))
        results[name] = {client: median(s) for client, s in samples.items()}
    report(results)


def report(results: dict[str, dict[str, Measure]]) -> None:
    print(f"{'case':<22}{'client':<12}{'blocked':>10}{'stored':>10}{'peak RSS':>12}")
    for name, by_client in results.items():
        for client, (blocked, stored, peak) in by_client.items():
            print(f"{name:<22}{client:<12}{blocked:>9.3f}s{stored:>9.3f}s{peak / MiB:>9.1f} MiB")
        (mb, ms, _), (_, ms2, _) = by_client["mlflow"], by_client["mlflow*"]
        ab, as_, _ = by_client["asynctrack"]
        print(
            f"{'':<22}blocked {ab / mb:.1%} of MLflow's; stored {ms / as_:.2f}x as fast as "
            f"MLflow ({ms2 / as_:.2f}x as fast as mlflow*)"
        )
    print("mlflow* = MLflow with AWS_REQUEST_CHECKSUM_CALCULATION=when_required")


if __name__ == "__main__":
    main()
