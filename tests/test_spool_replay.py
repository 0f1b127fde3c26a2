"""Replaying spools left by dead processes (``asynctrack sync`` / ``status``) against the real
test server: spool directories are written by hand with ``spool.Writer`` and closed without
emptying them, which is what a crashed process leaves behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner
from faults import FaultProxy
from mlflow import MlflowClient

from asynctrack._engine import replay, spool
from asynctrack._engine.events import Job, MetaEvent
from asynctrack._engine.retry import RetryPolicy
from asynctrack._engine.transport import Refused, Transient
from asynctrack.cli import main
from asynctrack.testing import MlflowServer, free_port

T0 = 1_700_000_000.0  # metric timestamps (seconds), fixed so they can be compared exactly


@pytest.fixture(autouse=True)
def _restore_global_tracking_uri() -> Iterator[None]:
    """The ``asynctrack`` group sets MLflow's process-wide URI from MLFLOW_TRACKING_URI."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    yield
    utils._tracking_uri = before


def new_run(client: MlflowClient, experiment_name: str) -> str:
    run_id: str = client.create_run(client.create_experiment(experiment_name)).info.run_id
    return run_id


def metrics(run_id: str, key: str, steps: range) -> list[Any]:
    return [(run_id, key, step * 0.5, T0 + step / 1000, step) for step in steps]


def param(run_id: str, key: str, value: str) -> MetaEvent:
    return MetaEvent("param", run_id, key, value)


def tag(run_id: str, key: str, value: str) -> MetaEvent:
    return MetaEvent("tag", run_id, key, value)


def end(run_id: str, status: str = "FINISHED") -> MetaEvent:
    return MetaEvent("end", run_id, "status", status)


def artifact(run_id: str, path: Path | str, artifact_path: str | None) -> Job:
    async def never(engine: Any) -> None:
        raise AssertionError("the spool keeps only `spooled`")

    return Job(run_id, "artifact", str(path), never, spooled=(str(path), artifact_path))


def write_spool(
    root: Path, uri: str, *segments: Sequence[Sequence[Any]], close: bool = True
) -> spool.Writer:
    """A writer directory with one segment per argument, each a list of records (event
    lists); closed without emptying it, as a process that died leaves it."""
    writer = spool.Writer(root, uri, segment_bytes=1 << 20, limit_bytes=1 << 30)
    for number, records in enumerate(segments):
        if number:
            writer.open_segment()
        for events in records:
            writer.append(spool.encode(list(events)))
    if close:
        writer.close(empty=False)
    return writer


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    found = client.get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in found)


def expected(steps: range) -> list[tuple[int, float, int]]:
    return [(step, step * 0.5, int((T0 + step / 1000) * 1000)) for step in steps]


def test_replays_metrics_params_tags_and_end(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    writer = write_spool(
        tmp_path,
        client.tracking_uri,
        [
            metrics(run_id, "loss", range(0, 700)),
            [param(run_id, "lr", "0.1"), tag(run_id, "t", "a")],
        ],
        [
            metrics(run_id, "loss", range(700, 1500)),
            [param(run_id, "lr", "0.1"), tag(run_id, "t", "b"), param(run_id, "depth", "3")],
            [*metrics(run_id, "acc", range(3)), end(run_id)],
        ],
    )
    seen: list[int] = []
    assert len(replay.status(tmp_path)) == 1

    report = replay.replay(tmp_path, progress=seen.append)

    assert report.ok, report
    assert report.stored == sum(seen) == 1500 + 2 + 3 + 3 + 1
    assert report.ended_runs == [] and report.skipped == []
    assert history(client, run_id, "loss") == expected(range(1500))
    assert history(client, run_id, "acc") == expected(range(3))
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "depth": "3"}
    assert run.data.tags["t"] == "b"
    assert run.info.status == "FINISHED"
    # the end came after the run's last metric: its timestamp stands for the end time
    assert run.info.end_time == expected(range(1499, 1500))[0][2]
    assert not writer.directory.exists()
    assert replay.status(tmp_path) == []


def test_records_marked_settled_are_neither_counted_nor_sent(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    writer = write_spool(
        tmp_path,
        client.tracking_uri,
        [metrics(run_id, "loss", range(0, 300)), metrics(run_id, "loss", range(300, 400))],
        [[param(run_id, "p", "1"), end(run_id)], metrics(run_id, "acc", range(5))],
        close=False,
    )
    # the writer's marker for the first record of each segment (records start after the
    # segment's header), written in segment 2
    first = len(spool.MAGIC)
    writer.append(spool.settled_record([(1, first), (2, first)]))
    writer.close(empty=False)
    [found] = replay.status(tmp_path)
    assert found.events == 100 + 5

    report = replay.replay(tmp_path)

    assert report.ok, report
    assert report.stored == 105
    # only what was not marked reached the server (here the marked part never did)
    assert history(client, run_id, "loss") == expected(range(300, 400))
    assert history(client, run_id, "acc") == expected(range(5))
    # the marked param and end are not sent again either, nor is the run ended as orphaned
    run = client.get_run(run_id)
    assert (run.data.params, run.info.status) == ({}, "RUNNING")
    assert not writer.directory.exists()


def test_a_version_1_segment_is_read_and_an_unknown_version_is_damage(tmp_path: Path) -> None:
    writer = write_spool(tmp_path, "http://127.0.0.1:1", [metrics("r", "m", range(10))])
    data = bytearray(writer.path(1).read_bytes())
    data[len(spool.MAGIC) - 1] = 1  # as asynctrack wrote before settled markers
    writer.path(1).write_bytes(bytes(data))
    assert [d.events for d in replay.status(tmp_path)] == [10]
    data[len(spool.MAGIC) - 1] = 9
    writer.path(1).write_bytes(bytes(data))
    [found] = replay.status(tmp_path)
    assert found.events == 0 and "version byte 9" in found.damage[0]


def test_a_sync_cut_short_marks_what_it_settled(tmp_path: Path) -> None:
    writer = write_spool(
        tmp_path,
        "http://127.0.0.1:1",
        [metrics("r", "m", range(10)), metrics("r", "m", range(10, 30))],
    )
    path = writer.path(1)
    mtime = path.stat().st_mtime_ns
    source = replay.SegmentSource([path], set(), set(), replay.SyncReport())
    handed = [source.next_chunk(), source.next_chunk()]
    assert [len(chunk[1]) if chunk else 0 for chunk in handed] == [10, 20]
    source.settled(1, now=False)  # the first chunk stored, then the server went away
    source.close()
    [found] = replay.status(tmp_path)
    assert found.events == 20
    assert path.stat().st_mtime_ns == mtime  # it still says when the writer died


def test_dead_directories_are_replayed_at_once_each_with_its_summary(
    client: MlflowClient, mlflow_server: MlflowServer, experiment_name: str, tmp_path: Path
) -> None:
    runs = [new_run(client, f"{experiment_name}-{i}") for i in range(3)]
    reports: list[replay.SyncReport] = []
    with FaultProxy(mlflow_server.url) as proxy:
        for run_id in runs:  # one request of metrics each: the 16 ranks of a job, in small
            write_spool(tmp_path, proxy.url, [metrics(run_id, "loss", range(10)), [end(run_id)]])
        proxy.hold(path="log-batch")
        syncing = threading.Thread(target=lambda: reports.append(replay.replay(tmp_path)))
        syncing.start()
        try:
            # two requests held at once come from two directories replayed at once
            proxy.wait_for(lambda: proxy.count("log-batch", "held") >= 2)
        finally:
            proxy.pass_through()
            proxy.release()
            syncing.join(60)
    [report] = reports
    assert report.ok, report
    assert report.stored == 3 * 11
    assert sorted(line.split(": ", 1)[1] for line in report.directories) == 3 * [
        "stored 11 events, refused 0, 0 left"
    ]
    for run_id in runs:
        assert history(client, run_id, "loss") == expected(range(10))
        assert client.get_run(run_id).info.status == "FINISHED"


def test_replaying_twice_stores_nothing_twice(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    writer = write_spool(
        tmp_path / "spool",
        client.tracking_uri,
        [metrics(run_id, "loss", range(50)), [param(run_id, "p", "1"), tag(run_id, "t", "x")]],
        [metrics(run_id, "loss", range(50, 80)), [end(run_id)]],
    )
    # what a sync killed before it could delete the segments would find again
    copy = tmp_path / "copy" / writer.directory.name
    shutil.copytree(writer.directory, copy)

    first = replay.replay(tmp_path / "spool")
    end_time = client.get_run(run_id).info.end_time
    second = replay.replay(copy)

    assert first.ok and second.ok, (first, second)
    assert first.stored == second.stored == 80 + 2 + 1
    assert history(client, run_id, "loss") == expected(range(80))
    assert client.get_run(run_id).info.end_time == end_time  # an end is never sent twice
    assert not copy.exists()


def test_live_directory_is_skipped_then_replayed_once_closed(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    writer = write_spool(
        tmp_path, client.tracking_uri, [metrics(run_id, "loss", range(10))], close=False
    )
    try:
        [live] = replay.status(tmp_path)
        assert live.alive and live.events == 10 and live.runs == [run_id]

        report = replay.replay(tmp_path)

        assert report.stored == 0 and report.left == 0
        assert len(report.skipped) == 1
        assert f"in use by pid {os.getpid()}" in report.skipped[0]
        assert writer.directory.name in report.skipped[0]
        assert writer.path(1).exists()
        assert history(client, run_id, "loss") == []
    finally:
        writer.close(empty=False)

    report = replay.replay(tmp_path)

    assert report.ok and report.stored == 10 and report.skipped == []
    assert history(client, run_id, "loss") == expected(range(10))


def test_runs_without_an_end_are_failed_or_left_running(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    experiment_id = client.create_experiment(experiment_name)
    died, kept, done = (client.create_run(experiment_id).info.run_id for _ in range(3))
    write_spool(
        tmp_path / "a",
        client.tracking_uri,
        [metrics(died, "loss", range(5)), [param(done, "p", "1"), end(done, "KILLED")]],
    )
    write_spool(tmp_path / "b", client.tracking_uri, [metrics(kept, "loss", range(5))])

    failed = replay.replay(tmp_path / "a")
    left_running = replay.replay(tmp_path / "b", status=None)

    assert failed.ok and failed.ended_runs == [died] and failed.open_runs == []
    assert left_running.ok and left_running.ended_runs == [] and left_running.open_runs == [kept]
    assert client.get_run(died).info.status == "FAILED"
    assert client.get_run(kept).info.status == "RUNNING"
    assert client.get_run(done).info.status == "KILLED"
    assert history(client, died, "loss") == history(client, kept, "loss") == expected(range(5))


def test_a_run_a_live_process_still_logs_to_is_not_ended(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    shared = new_run(client, experiment_name)
    write_spool(tmp_path, client.tracking_uri, [metrics(shared, "loss", range(5))])
    live = write_spool(
        tmp_path, client.tracking_uri, [metrics(shared, "loss", range(5, 10))], close=False
    )
    try:
        report = replay.replay(tmp_path)
    finally:
        live.close(empty=False)

    assert report.ok and report.stored == 5 and report.ended_runs == []
    assert len(report.skipped) == 1 and live.directory.name in report.skipped[0]
    assert client.get_run(shared).info.status == "RUNNING"

    report = replay.replay(tmp_path)  # the live process died too: now the run is orphaned

    assert report.ok and report.stored == 5 and report.ended_runs == [shared]
    assert client.get_run(shared).info.status == "FAILED"
    assert history(client, shared, "loss") == expected(range(10))


def test_damaged_segments_replay_up_to_the_damage(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    torn = [metrics(run_id, "loss", range(s, s + 10)) for s in (0, 10, 20)]
    flipped = [metrics(run_id, "loss", range(s, s + 10)) for s in (30, 40, 50)]
    writer = write_spool(tmp_path, client.tracking_uri, torn, flipped)
    sizes = [len(spool.encode(r)) for r in torn]
    with writer.path(1).open("r+b") as segment:  # a crash in the middle of the last write
        segment.truncate(len(spool.MAGIC) + sum(sizes) - 5)
    data = bytearray(writer.path(2).read_bytes())
    data[len(spool.MAGIC) + sizes[0] + 8 + 20] ^= 0xFF  # inside the second record's payload
    writer.path(2).write_bytes(bytes(data))

    [found] = replay.status(tmp_path)
    assert found.events == 30 and len(found.damage) == 2

    report = replay.replay(tmp_path)

    assert not report.ok
    assert report.stored == 30 and report.left == 0 and report.refused == []
    first, second = report.damaged
    assert "00000001.seg" in first and "torn" in first
    assert f"2 records (20 events) replayed, {sizes[2] - 5} bytes lost" in first
    assert "00000002.seg" in second and "checksum mismatch" in second
    assert f"1 records (10 events) replayed, {sizes[1] + sizes[2]} bytes lost" in second
    assert history(client, run_id, "loss") == expected(range(0, 20)) + expected(range(30, 40))
    left = sorted(p.name for p in writer.directory.iterdir())
    assert left == ["00000001.seg.damaged", "00000002.seg.damaged", "owner.json"]
    assert replay.status(tmp_path) == []  # kept for inspection, never replayed again
    assert replay.replay(tmp_path).stored == 0


def test_a_refused_param_is_reported_and_the_rest_lands(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    client.log_param(run_id, "lr", "0.1")
    write_spool(
        tmp_path,
        client.tracking_uri,
        [
            [param(run_id, "lr", "0.2"), param(run_id, "depth", "3"), tag(run_id, "t", "x")],
            metrics(run_id, "loss", range(20)),
            [param(run_id, "seed", "7"), end(run_id)],
        ],
    )

    report = replay.replay(tmp_path)

    assert not report.ok
    [rejection] = report.refused
    assert (rejection.run_id, rejection.kind, rejection.key) == (run_id, "param", "lr")
    assert "INVALID_PARAMETER_VALUE" in rejection.reason
    assert report.stored == 20 + 4 and report.left == 0
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1", "depth": "3", "seed": "7"}
    assert run.data.tags["t"] == "x"
    assert run.info.status == "FINISHED"
    assert history(client, run_id, "loss") == expected(range(20))
    assert replay.status(tmp_path) == []


def test_artifacts_are_uploaded_and_a_missing_staged_file_is_reported(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    # the engine spools a staging area: a directory laid out as run-relative paths
    staging = tmp_path / "staging" / "asynctrack-1-x"
    area = staging / "engine-1" / "0"
    files = {"plots/weights.bin": os.urandom(300_000), "notes.txt": b"epoch 3\n"}
    for name, data in files.items():
        (area / name).parent.mkdir(parents=True, exist_ok=True)
        (area / name).write_bytes(data)
    single = tmp_path / "single" / "table.csv"  # or one staged file and its directory
    single.parent.mkdir()
    files["tables/table.csv"] = b"a,b\n1,2\n"
    single.write_bytes(files["tables/table.csv"])
    missing = staging / "engine-1" / "1"
    write_spool(
        tmp_path / "spool",
        client.tracking_uri,
        [[artifact(run_id, area, None), artifact(run_id, single, "tables")]],
        [[artifact(run_id, missing, None), end(run_id)]],
    )

    report = replay.replay(tmp_path / "spool")

    assert report.refused == [] and not report.ok
    assert report.lost == [f"run {run_id}: artifact '1': its staged copy is gone (from {missing})"]
    assert report.stored == 2 + 1  # the uploads and the run's end
    for name, data in files.items():
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=name,
            dst_path=str(tmp_path / "download"),
            tracking_uri=client.tracking_uri,
        )
        stored = hashlib.sha256(Path(local).read_bytes()).hexdigest()
        assert stored == hashlib.sha256(data).hexdigest(), name
    # staged copies go once their segment is done, with the dead process's staging dirs
    assert not staging.exists() and not single.exists()
    assert client.get_run(run_id).info.status == "FINISHED"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def test_cli_status_and_sync(
    client: MlflowClient, experiment_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = new_run(client, experiment_name)
    writer = write_spool(
        tmp_path, client.tracking_uri, [metrics(run_id, "loss", range(30)), [end(run_id)]]
    )
    monkeypatch.setenv("ASYNCTRACK_SPOOL_DIR", str(tmp_path))  # the default SPOOL_DIR

    shown = invoke("status")
    assert shown.exit_code == 0, shown.output
    [line] = [x for x in shown.stdout.splitlines() if writer.directory.name in x]
    assert " dead " in line and " 31 " in line and run_id in line

    synced = invoke("sync", str(tmp_path))
    assert synced.exit_code == 0, synced.output
    assert "stored 31 events, refused 0, 0 left" in synced.stdout
    assert history(client, run_id, "loss") == expected(range(30))

    after = invoke("status", str(tmp_path))
    assert after.exit_code == 0 and f"nothing waiting in {tmp_path}" in after.stdout


def test_cli_sync_exits_1_on_damage(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    writer = write_spool(
        tmp_path, client.tracking_uri, [metrics(run_id, "loss", range(10)), [end(run_id)]]
    )
    with writer.path(1).open("ab") as segment:
        segment.write(b"\x00\x00\x01")  # a torn header

    result = invoke("sync", str(writer.directory), "--status", "none")

    assert result.exit_code == 1
    assert "stored 11 events" in result.stdout
    assert "damaged:" in result.stdout and "00000001.seg" in result.stdout
    assert "3 bytes lost" in result.stdout
    assert client.get_run(run_id).info.status == "FINISHED"


def test_cli_sync_needs_tracking_uri_when_credentials_were_redacted(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    redacted = client.tracking_uri.replace("http://", "http://***@")
    write_spool(tmp_path, redacted, [metrics(run_id, "loss", range(5))])

    refused = invoke("sync", str(tmp_path))

    assert refused.exit_code == 1
    assert "--tracking-uri" in refused.output and "5 left" in refused.stdout
    assert history(client, run_id, "loss") == []

    synced = invoke("--tracking-uri", client.tracking_uri, "sync", str(tmp_path))

    assert synced.exit_code == 0, synced.output
    assert f"runs ended FAILED (their process died first): {run_id}" in synced.stdout
    assert history(client, run_id, "loss") == expected(range(5))


def test_cli_sync_leaves_everything_when_the_server_is_unreachable(
    client: MlflowClient, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    writer = write_spool(
        tmp_path,
        dead,
        [metrics("run-a", "loss", range(40))],
        [[param("run-a", "p", "1"), end("run-a")]],
    )
    result = invoke("sync", str(tmp_path), "--timeout", "1")

    assert result.exit_code == 1
    assert "stored 0 events, refused 0, 42 left" in result.stdout
    assert "did not answer in time" in result.output
    assert writer.path(1).exists() and writer.path(2).exists()
    [found] = replay.status(tmp_path)
    assert found.events == 42 and not found.alive


def test_transient_failures_are_retried_until_an_answer() -> None:
    failures = iter(["HTTP 503", "connection refused"])

    def flaky() -> str:
        reason = next(failures, None)
        if reason is not None:
            raise Transient(reason)
        return "stored"

    policy = RetryPolicy(first=0.01, maximum=0.02, patience=30.0)
    seen: list[str] = []
    assert policy.attempt_blocking(flaky, lambda exc: seen.append(str(exc))) == "stored"
    assert seen == ["HTTP 503", "connection refused"]

    def refused() -> None:
        raise Refused("INVALID_PARAMETER_VALUE: no", splittable=True)

    assert isinstance(policy.attempt_blocking(refused, seen.append), Refused)


def test_an_upload_its_writer_finished_is_not_redone(
    client: MlflowClient, experiment_name: str, tmp_path: Path
) -> None:
    run_id = new_run(client, experiment_name)
    gone = tmp_path / "staging" / "0"  # the worker removed the area once it was uploaded
    root = tmp_path / "spool"
    writer = spool.Writer(root, client.tracking_uri, segment_bytes=1 << 20, limit_bytes=1 << 30)
    writer.append(spool.encode([artifact(run_id, gone, None), *metrics(run_id, "m", range(3))]))
    writer.open_segment()
    writer.append(spool.done_record(run_id, str(gone)))
    writer.close(empty=False)

    [found] = replay.status(root)
    assert found.events == 3  # the upload is not waiting: its writer finished it
    report = replay.replay(root)

    assert report.ok, report
    assert report.stored == 3
    assert [m.step for m in client.get_metric_history(run_id, "m")] == [0, 1, 2]
    assert not root.exists() or not any(root.iterdir())
