"""Artifacts through asynctrack, read back with MLflow's own client and compared by sha256.

Every test runs against a real MLflow server in direct mode (the client writes to S3) or
proxied mode (the server does), with moto's S3 server checking credentials; tests
synchronise with ``flush()`` or the run's end only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pytest
import yaml

import asynctrack
from asynctrack import (
    AccessDeniedError,
    DeliveryError,
    MLflowExperimentTracker,
    NestedRunTracker,
    log_artifact_decorator,
)
from asynctrack._artifacts import s3 as s3_upload
from asynctrack._artifacts import staging
from asynctrack._engine import runtime
from asynctrack._engine.engine import Engine
from asynctrack.config import EngineConfig

if TYPE_CHECKING:
    from artifact_servers import ArtifactMode, IamS3Server

# The servers are session fixtures: loaded as a plugin, they start once for both modules.
# (Imported at the top, the plugin would escape pytest's assert rewriting.)
pytest_plugins = ["artifact_servers"]

MiB = 1024 * 1024


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def download(url: str, run_id: str, artifact_path: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"download-{uuid.uuid4().hex[:8]}"
    dst.mkdir()
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=url
        )
    )


def tree_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


@contextlib.contextmanager
def dedicated_engine(url: str, **settings: object) -> Iterator[Engine]:
    """An engine with its own settings for ``url`` (configure() is process-wide and refuses
    once engines run); ``url`` names a server under another spelling, so it gets its own."""
    engine = Engine(url, EngineConfig.resolve(**settings))
    with runtime._lock:
        assert url not in runtime._engines
        runtime._engines[url] = engine
    try:
        yield engine
    finally:
        engine.close(10)
        with runtime._lock:
            runtime._engines.pop(url, None)


def localhost(url: str) -> str:
    return url.replace("127.0.0.1", "localhost")


@pytest.fixture
def tracker(artifact_mode: ArtifactMode, experiment_name: str) -> MLflowExperimentTracker:
    return MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=artifact_mode.url)


# ------------------------------------------------------------------------- what gets stored


def test_single_files_land_where_mlflow_looks(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    png = write(tmp_path / "reports/figures/residuals.png", os.urandom(300_000))
    notes = write(tmp_path / "notes.txt", b"first run\n")
    with tracker.start_run():
        tracker.log_artifact(str(png), artifact_path="plots")
        tracker.log_artifact(notes)
        run_id = tracker.run_id
        assert run_id is not None
        assert tracker.artifact_uri is not None
        expected_scheme = "s3://" if artifact_mode.name == "direct" else "mlflow-artifacts:"
        assert tracker.artifact_uri.startswith(expected_scheme)
    client = mlflow.MlflowClient(artifact_mode.url)
    assert {f.path for f in client.list_artifacts(run_id)} == {"plots", "notes.txt"}
    assert [f.path for f in client.list_artifacts(run_id, "plots")] == ["plots/residuals.png"]
    assert sha256(download(artifact_mode.url, run_id, "plots/residuals.png", tmp_path)) == sha256(
        png
    )
    assert download(artifact_mode.url, run_id, "notes.txt", tmp_path).read_bytes() == b"first run\n"


def test_content_type_is_set(direct_mode: ArtifactMode, s3: IamS3Server, tmp_path: Path) -> None:
    tracker = MLflowExperimentTracker(
        experiment_name=f"ctype-{uuid.uuid4().hex[:8]}", tracking_uri=direct_mode.url
    )
    with tracker.start_run():
        tracker.log_artifact(write(tmp_path / "plot.png", b"\x89PNG"))
        tracker.log_artifact(write(tmp_path / "table.csv", b"a,b\n"))
        uri = tracker.artifact_uri
    assert uri is not None
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    client = s3.client()
    assert client.head_object(Bucket=bucket, Key=f"{prefix}/plot.png")["ContentType"] == "image/png"
    assert client.head_object(Bucket=bucket, Key=f"{prefix}/table.csv")["ContentType"] == "text/csv"


def test_directory_with_subfolders(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    src = tmp_path / "outputs"
    for rel in ("a.txt", "sub/b.bin", "sub/deeper/c.json", "other/d.txt"):
        write(src / rel, os.urandom(4096 + len(rel)))
    with tracker.start_run():
        tracker.log_artifacts(src, artifact_path="run-outputs")
        tracker.log_artifacts(str(src / "sub"))  # at the run's root
        run_id = tracker.run_id
    assert run_id is not None
    stored = download(artifact_mode.url, run_id, "run-outputs", tmp_path)
    assert tree_digests(stored) == tree_digests(src)
    root = download(artifact_mode.url, run_id, "deeper", tmp_path)
    assert tree_digests(root) == tree_digests(src / "sub/deeper")


def test_file_overwritten_right_after_the_call_keeps_first_content(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    path = write(tmp_path / "residuals.png", b"epoch 0 " * 10_000)
    logged = []
    with tracker.start_run():
        for epoch in range(1, 4):
            logged.append(sha256(path))
            tracker.log_artifact(path, artifact_path=f"epoch-{epoch}")
            with open(path, "r+b") as f:  # in place: same inode, as savefig rewrites it
                f.write(f"epoch {epoch} ".encode() * 10_000)
        run_id = tracker.run_id
    assert run_id is not None
    stored = [
        sha256(download(artifact_mode.url, run_id, f"epoch-{e}/residuals.png", tmp_path))
        for e in range(1, 4)
    ]
    assert stored == logged
    assert len(set(logged)) == 3


def test_dicts_as_json_and_yaml(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    grid = {"n_estimators": [100, 200, 300], "max_depth": [5, 10, 15], "note": "grid"}
    with tracker.start_run():
        tracker.log_dict(grid, "param_grid.json")
        tracker.log_dict(grid, "configs/grid.yaml")
        grid["note"] = "changed after the call"
        tracker.log_text("plain text ✓", "notes/readme.txt")
        run_id = tracker.run_id
    assert run_id is not None
    stored_json = download(artifact_mode.url, run_id, "param_grid.json", tmp_path).read_text()
    stored_yaml = download(artifact_mode.url, run_id, "configs/grid.yaml", tmp_path).read_text()
    expected = {**grid, "note": "grid"}
    assert stored_json == json.dumps(expected, indent=2)  # what mlflow.log_dict writes
    assert yaml.safe_load(stored_yaml) == expected
    assert stored_yaml == yaml.dump(expected, indent=2, default_flow_style=False)
    text = download(artifact_mode.url, run_id, "notes/readme.txt", tmp_path)
    assert text.read_text(encoding="utf-8") == "plain text ✓"


def test_matplotlib_figure_rendered_at_the_call(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2])
    reference = tmp_path / "reference.png"
    fig.savefig(reference)
    with tracker.start_run():
        tracker.log_figure(fig, "plots/curve.png")
        ax.plot([1, 2, 3], [1, 2, 3])  # drawn after the call: not in the stored image
        run_id = tracker.run_id
    plt.close(fig)
    assert run_id is not None
    assert sha256(download(artifact_mode.url, run_id, "plots/curve.png", tmp_path)) == sha256(
        reference
    )
    with tracker.start_run(), pytest.raises(TypeError, match="unsupported figure type"):
        tracker.log_figure(object(), "x.png")


@pytest.mark.parametrize("checksums", [True, False])
def test_large_file_goes_multipart(
    artifact_servers: dict[str, ArtifactMode],
    s3_env: IamS3Server,
    experiment_name: str,
    tmp_path: Path,
    checksums: bool,
) -> None:
    """12 MiB with a 5 MiB threshold and parts: three parts, sent concurrently, each with
    its CRC32 unless checksums are off."""
    big = write(tmp_path / "weights.bin", os.urandom(12 * MiB + 7))
    url = localhost(artifact_servers["direct"].url)
    settings = {
        "multipart_threshold": 5 * MiB,
        "multipart_part_size": 5 * MiB,
        "multipart_checksums": checksums,
    }
    with dedicated_engine(url, **settings) as engine:
        tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=url)
        with tracker.start_run():
            tracker.log_artifact(big, artifact_path="checkpoints")
            run_id, uri = tracker.run_id, tracker.artifact_uri
        assert engine.stats().files_uploaded == 1
        assert engine.stats().bytes_uploaded == 12 * MiB + 7
    assert run_id is not None and uri is not None
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    head = s3_env.client().head_object(
        Bucket=bucket, Key=f"{prefix}/checkpoints/weights.bin", ChecksumMode="ENABLED"
    )
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    assert ("ChecksumCRC32" in head) is checksums, head  # S3 kept the parts' CRC32
    assert sha256(download(url, run_id, "checkpoints/weights.bin", tmp_path)) == sha256(big)


def test_proxied_server_with_destination_configured_uploads_straight_to_s3(
    artifact_servers: dict[str, ArtifactMode],
    s3_env: IamS3Server,
    experiment_name: str,
    tmp_path: Path,
) -> None:
    url = localhost(artifact_servers["proxied"].url)
    big = write(tmp_path / "big.bin", os.urandom(6 * MiB))
    small = write(tmp_path / "small.txt", b"small")
    settings = {
        "artifacts_destination": f"s3://{artifact_servers['proxied'].bucket}",
        "multipart_threshold": 5 * MiB,
        "multipart_part_size": 5 * MiB,
    }
    denied = r"forbidden/small\.txt: S3 refused it: AccessDenied"
    with dedicated_engine(url, spool_dir=str(tmp_path / "spool"), **settings):
        tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=url)
        # the run's end waits behind the upload kept for a permission: kept too
        with pytest.raises(AccessDeniedError, match=denied), tracker.start_run():
            tracker.log_artifact(big)
            tracker.log_artifact(small, "forbidden")  # denied to the S3 user, not the server
            run_id = tracker.run_id
            with pytest.raises(AccessDeniedError, match=denied):
                tracker.flush()
    assert run_id is not None
    # Read back through the server: the keys are where the server itself puts them.
    assert sha256(download(url, run_id, "big.bin", tmp_path)) == sha256(big)
    # The denied file stays staged in the spool, for `asynctrack sync` once it is allowed.
    [kept] = (tmp_path / "spool").glob("*/staged/*/forbidden/small.txt")
    assert kept.read_bytes() == b"small"


# ------------------------------------------------------------------------- decorator, async


def test_log_artifact_decorator_sync_and_async(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    @log_artifact_decorator(artifact_path="plots")
    def create_plot(name: str) -> str:
        return str(write(tmp_path / name, name.encode() * 100))

    @log_artifact_decorator()
    async def export(name: str) -> Path:
        await asyncio.sleep(0)
        return write(tmp_path / name, b"async " * 100)

    with tracker.start_run():
        assert create_plot("residuals.png") == str(tmp_path / "residuals.png")
        asyncio.run(export("report.txt"))
        with pytest.raises(TypeError, match="must return a file path"):
            log_artifact_decorator()(lambda: 42)()
        run_id = tracker.run_id
    assert run_id is not None
    stored = download(artifact_mode.url, run_id, "plots/residuals.png", tmp_path)
    assert stored.read_bytes() == b"residuals.png" * 100
    assert download(artifact_mode.url, run_id, "report.txt", tmp_path).read_bytes() == (
        b"async " * 100
    )


async def test_logging_from_async_code_never_waits(
    artifact_mode: ArtifactMode, experiment_name: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "async.bin", os.urandom(50_000))
    tracker = MLflowExperimentTracker(
        experiment_name=experiment_name, tracking_uri=artifact_mode.url
    )
    async with tracker.start_run():
        tracker.log_artifact(path)
        with NestedRunTracker(run_name="child") as child:
            child.log_dict({"fold": 1}, "fold.json")
            child_id = child.run_id
        await tracker.aflush()
        run_id = tracker.run_id
    assert run_id is not None and child_id is not None
    assert sha256(download(artifact_mode.url, run_id, "async.bin", tmp_path)) == sha256(path)
    stored = download(artifact_mode.url, child_id, "fold.json", tmp_path)
    assert json.loads(stored.read_text()) == {"fold": 1}


def test_stats_count_files_and_bytes(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    before = tracker.stats()
    with tracker.start_run():
        tracker.log_artifact(write(tmp_path / "a.bin", b"a" * 1000))
        tracker.log_artifacts(write(tmp_path / "d/b", b"b").parent)
        tracker.flush()
        after = tracker.stats()
    assert after.files_uploaded - before.files_uploaded == 2
    assert after.bytes_uploaded - before.bytes_uploaded == 1001
    assert after.files_queued == after.bytes_queued == 0
    # The staged copies are gone once stored.
    staged = staging.engine_dir(tracker._engine())
    assert not [p for p in staged.rglob("*") if p.is_file()]


def test_transient_failures_are_retried(
    direct_mode: ArtifactMode,
    experiment_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two 503 SlowDown answers, then S3 takes the file: stored, and the retries counted."""
    from botocore.exceptions import ClientError

    real_client = s3_upload._client
    refusals = [2]

    class Flaky:
        def __init__(self, client: Any) -> None:
            self._client = client

        def __getattr__(self, name: str) -> Any:
            return getattr(self._client, name)

        async def put_object(self, **kwargs: Any) -> Any:
            if refusals[0]:
                refusals[0] -= 1
                error = {"Code": "SlowDown", "Message": "Please reduce your request rate."}
                meta = {"HTTPStatusCode": 503}
                raise ClientError({"Error": error, "ResponseMetadata": meta}, "PutObject")
            return await self._client.put_object(**kwargs)

    async def flaky_client(engine: Engine, settings: Any) -> Flaky:
        return Flaky(await real_client(engine, settings))

    monkeypatch.setattr(s3_upload, "_client", flaky_client)
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    path = write(tmp_path / "flaky.txt", b"eventually")
    before = tracker.stats()
    with tracker.start_run():
        tracker.log_artifact(path)
        run_id = tracker.run_id
    assert run_id is not None
    assert tracker.stats().files_retried - before.files_retried == 2
    assert "SlowDown" in tracker._engine().last_error()
    assert download(direct_mode.url, run_id, "flaky.txt", tmp_path).read_bytes() == b"eventually"


def test_uploads_left_at_exit_are_stored_by_the_exit_flush(
    direct_mode: ArtifactMode, experiment_name: str, tmp_path: Path
) -> None:
    """No flush, no run end: the interpreter's exit sends it. The endpoint is a host name,
    so the upload needs a name lookup while Python is shutting down."""
    path = write(tmp_path / "last-words.txt", b"stored at exit")
    script = (
        "import sys\n"
        "from asynctrack import MLflowExperimentTracker\n"
        "tracker = MLflowExperimentTracker(experiment_name=sys.argv[1], tracking_uri=sys.argv[2])\n"
        "tracker.start_run().__enter__()\n"
        "tracker.log_artifact(sys.argv[3])\n"
        "print(tracker.run_id)\n"
    )
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": localhost(os.environ["MLFLOW_S3_ENDPOINT_URL"])}
    done = subprocess.run(
        [sys.executable, "-c", script, experiment_name, direct_mode.url, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "could not be stored" not in done.stderr
    run_id = done.stdout.strip().splitlines()[-1]
    assert download(direct_mode.url, run_id, "last-words.txt", tmp_path).read_bytes() == (
        b"stored at exit"
    )


# ------------------------------------------------------------------------- failures


def test_missing_paths_raise_at_the_call(
    tracker: MLflowExperimentTracker, artifact_mode: ArtifactMode, tmp_path: Path
) -> None:
    kept = write(tmp_path / "kept.txt", b"kept")
    with tracker.start_run():
        with pytest.raises(FileNotFoundError, match=r"nope\.png"):
            tracker.log_artifact(tmp_path / "nope.png")
        with pytest.raises(FileNotFoundError, match="no-dir"):
            tracker.log_artifacts(tmp_path / "no-dir")
        with pytest.raises(IsADirectoryError):
            tracker.log_artifact(tmp_path)
        with pytest.raises(NotADirectoryError):
            tracker.log_artifacts(kept)
        tracker.log_artifact(kept)
        run_id = tracker.run_id
    assert run_id is not None
    assert download(artifact_mode.url, run_id, "kept.txt", tmp_path).read_bytes() == b"kept"


@pytest.mark.parametrize(
    "call",
    [
        lambda t, f: t.log_artifact(f, artifact_path="../outside"),
        lambda t, f: t.log_artifact(f, artifact_path="a/../../outside"),
        lambda t, f: t.log_artifact(f, artifact_path="/etc"),
        lambda t, f: t.log_artifacts(f.parent, artifact_path=".."),
        lambda t, f: t.log_dict({}, "../escape.json"),
        lambda t, f: t.log_dict({}, "/abs/escape.yaml"),
        lambda t, f: t.log_text("x", "dir/.."),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "dir-dotdot", "dict-dotdot", "dict-abs", "no-name"],
)
def test_paths_leaving_the_run_raise_value_error(
    call: object, direct_mode: ArtifactMode, experiment_name: str, tmp_path: Path
) -> None:
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    kept = write(tmp_path / "kept.txt", b"still stored")
    with tracker.start_run():
        with pytest.raises(ValueError):
            call(tracker, kept)  # type: ignore[operator]
        tracker.log_artifact(kept)
        run_id = tracker.run_id
    assert run_id is not None
    assert download(direct_mode.url, run_id, "kept.txt", tmp_path).read_bytes() == b"still stored"


def test_uploads_s3_denies_are_kept_and_the_rest_stored(
    direct_mode: ArtifactMode, experiment_name: str, tmp_path: Path
) -> None:
    """The S3 user may not write under */forbidden/*: a permission refused, which the user
    can fix, so those files are kept on disk (not refused) and everything else is stored."""
    src = tmp_path / "outputs"
    write(src / "ok.txt", b"ok")
    write(src / "forbidden/secret.txt", b"no")
    single = write(tmp_path / "alone.txt", b"alone")
    url = localhost(direct_mode.url)
    with dedicated_engine(url, spool_dir=str(tmp_path / "spool")):
        tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=url)
        with pytest.raises(AccessDeniedError), tracker.start_run():
            tracker.log_artifacts(src)
            tracker.log_artifact(single, "forbidden")
            tracker.log_metric("loss", 0.5)
            run_id = tracker.run_id
            with pytest.raises(AccessDeniedError) as caught:
                tracker.flush()
        stats = tracker.stats()
    assert run_id is not None
    assert caught.value.rejections == []
    [kept] = caught.value.kept
    assert kept.count == 2 and "AccessDenied (403)" in kept.reason
    assert download(url, run_id, "ok.txt", tmp_path).read_bytes() == b"ok"
    run = mlflow.MlflowClient(url).get_run(run_id)
    assert run.data.metrics == {"loss": 0.5}
    assert run.info.status == "RUNNING"  # its end is kept behind the uploads
    staged = {p.name: p.read_bytes() for p in (tmp_path / "spool").glob("*/staged/*/forbidden/*")}
    assert staged == {"secret.txt": b"no", "alone.txt": b"alone"}
    assert (stats.files_failed, stats.files_uploaded, stats.files_queued) == (0, 1, 2)


def test_missing_bucket_reported_at_run_end(
    direct_mode: ArtifactMode, experiment_name: str, tmp_path: Path
) -> None:
    client = mlflow.MlflowClient(direct_mode.url)
    client.create_experiment(experiment_name, artifact_location="s3://no-such-bucket-here/x")
    tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=direct_mode.url)
    path = write(tmp_path / "model.txt", b"x")
    with pytest.raises(DeliveryError, match=r"model\.txt.*NoSuchBucket"), tracker.start_run():
        tracker.log_artifact(path)
        tracker.log_param("alpha", 0.1)
        run_id = tracker.run_id
    assert run_id is not None
    assert client.get_run(run_id).data.params == {"alpha": "0.1"}


def test_wrong_credentials_keep_the_upload_until_fixed_and_never_leak(
    direct_mode: ArtifactMode,
    s3: IamS3Server,
    experiment_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_id, secret = "AKIAWRONGWRONGWRONG1", "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    url = localhost(direct_mode.url)
    caplog.set_level(logging.DEBUG, logger="asynctrack")
    with dedicated_engine(url, spool_dir=str(tmp_path / "spool")):
        tracker = MLflowExperimentTracker(experiment_name=experiment_name, tracking_uri=url)
        with tracker.start_run():
            tracker.log_artifact(write(tmp_path / "a.txt", b"a"))
            tracker.log_metric("m", 1.0)
            run_id = tracker.run_id
            with pytest.raises(AccessDeniedError, match=r"a\.txt.*InvalidAccessKeyId") as caught:
                tracker.flush()
            for text in (str(caught.value), caplog.text, repr(asynctrack.stats())):
                assert secret not in text and key_id not in text
            # Fixed: the kept upload is sent again with the credentials read anew.
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
            tracker.flush()
    assert run_id is not None
    assert download(url, run_id, "a.txt", tmp_path).read_bytes() == b"a"
    run = mlflow.MlflowClient(url).get_run(run_id)
    assert run.data.metrics == {"m": 1.0}
    assert run.info.status == "FINISHED"
