"""The ``asynctrack`` command against the real test server: ``runs compare|best|summary``,
``models list`` and ``plot``, through click's runner and as a subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from mlflow import MlflowClient
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression

from asynctrack import MLflowExperimentTracker, register_best_model, transition_model_stage
from asynctrack.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_global_tracking_uri() -> Iterator[None]:
    """``asynctrack --tracking-uri`` (or MLFLOW_TRACKING_URI) sets MLflow's process-wide
    URI; put it back so later tests resolve theirs as before."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    yield
    utils._tracking_uri = before


@pytest.fixture
def runs(client: MlflowClient, tracker: MLflowExperimentTracker) -> dict[str, str]:
    """Three finished runs: beta (best r2), curve (a loss curve over 10 steps), alpha."""
    ids = {}
    for name, r2, rmse, depth in (("alpha", 0.5, 3.0, 3), ("beta", 0.8, 2.0, 5)):
        with tracker.start_run(run_name=name):
            tracker.log_params({"max_depth": depth})
            tracker.log_metrics({"r2_score": r2, "rmse": rmse})
        ids[name] = str(tracker.run_id)
    with tracker.start_run(run_name="curve"):
        tracker.log_params({"max_depth": 7})
        for step in range(10):
            tracker.log_metric("loss", 1.0 / (step + 1), step=step)
        tracker.log_metrics({"r2_score": 0.6, "rmse": 2.5})
    ids["curve"] = str(tracker.run_id)
    return ids


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_runs_compare_table_csv_json(experiment_name: str, runs: dict[str, str]) -> None:
    table = invoke("runs", "compare", experiment_name).stdout
    lines = table.splitlines()
    header = lines[0].split()
    for column in ("run_id", "run_name", "status", "metric_r2_score"):
        assert column in header
    assert not [c for c in header if c.startswith("param_")]  # params only on request
    assert [line.split()[1] for line in lines[1:]] == ["beta", "curve", "alpha"]
    assert [line.split()[0] for line in lines[1:]] == [
        runs[n][:8] for n in ("beta", "curve", "alpha")
    ]  # short ids in a table

    rows = list(
        csv.DictReader(
            io.StringIO(
                invoke("runs", "compare", experiment_name, "--params", "--format", "csv").stdout
            )
        )
    )
    assert [r["run_name"] for r in rows] == ["beta", "curve", "alpha"]
    assert [r["run_id"] for r in rows] == [runs["beta"], runs["curve"], runs["alpha"]]
    assert [float(r["metric_r2_score"]) for r in rows] == [0.8, 0.6, 0.5]
    assert [r["param_max_depth"] for r in rows] == ["5", "7", "3"]
    assert {r["status"] for r in rows} == {"FINISHED"}

    records = json.loads(
        invoke(
            "runs",
            "compare",
            experiment_name,
            "--metric",
            "rmse",
            "--top-n",
            "2",
            "--format",
            "json",
        ).stdout
    )
    assert [r["run_name"] for r in records] == ["alpha", "curve"]  # by rmse, highest first
    assert [r["metric_rmse"] for r in records] == [3.0, 2.5]
    assert {k for k in records[0] if k.startswith("metric_")} == {"metric_rmse"}
    assert records[0]["start_time"].startswith("20")  # ISO dates


def test_runs_best_table_csv_json(experiment_name: str, runs: dict[str, str]) -> None:
    best = json.loads(invoke("runs", "best", experiment_name, "--format", "json").stdout)
    assert best["run_id"] == runs["beta"] and best["run_name"] == "beta"
    assert best["metrics"] == {"r2_score": 0.8, "rmse": 2.0}
    assert best["params"] == {"max_depth": "5"}
    assert best["status"] == "FINISHED"

    rows = dict(
        csv.reader(
            io.StringIO(
                invoke(
                    "runs",
                    "best",
                    experiment_name,
                    "--metric",
                    "rmse",
                    "--ascending",
                    "--format",
                    "csv",
                ).stdout
            )
        )
    )
    assert rows["key"] == "value"
    assert rows["run_id"] == runs["beta"]
    assert float(rows["metrics.rmse"]) == 2.0

    table = invoke("runs", "best", experiment_name, "--metric", "loss").stdout
    fields = dict(line.split(None, 1) for line in table.splitlines())
    assert fields["run_name"] == "curve" and fields["run_id"] == runs["curve"]
    assert float(fields["metrics.loss"]) == 0.1  # the last value of the curve


def test_runs_summary_table_csv_json(experiment_name: str, runs: dict[str, str]) -> None:
    summary = json.loads(invoke("runs", "summary", experiment_name, "--format", "json").stdout)
    assert summary["total_runs"] == summary["finished_runs"] == 3
    assert summary["failed_runs"] == 0
    assert summary["best_r2"] == 0.8 and summary["best_rmse"] == 2.0
    assert summary["avg_r2"] == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    assert summary["metrics"]["loss"] == {"count": 1, "min": 0.1, "max": 0.1, "mean": 0.1}

    rows = dict(
        csv.reader(
            io.StringIO(invoke("runs", "summary", experiment_name, "--format", "csv").stdout)
        )
    )
    assert rows["total_runs"] == "3"
    assert float(rows["metrics.rmse.max"]) == 3.0

    table = invoke("runs", "summary", experiment_name).stdout
    fields = dict(line.split(None, 1) for line in table.splitlines())
    assert fields["finished_runs"] == "3"
    assert float(fields["metrics.r2_score.min"]) == 0.5


def test_models_list(client: MlflowClient, experiment_name: str) -> None:
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    tracker = MLflowExperimentTracker(experiment_name=experiment_name)
    with tracker.start_run(run_name="linear"):
        model = LinearRegression().fit(X, y)
        tracker.log_metric("r2_score", float(model.score(X, y)))
        tracker.log_model(model, name="model", pip_requirements=["scikit-learn"])
    name = f"{experiment_name}-registered"
    version = register_best_model(experiment_name, name)
    transition_model_stage(name, version, "Production")

    records = json.loads(invoke("models", "list", "--format", "json").stdout)
    mine = [r for r in records if r["name"] == name]
    assert mine == [
        {
            "name": name,
            "latest_version": "1",
            "latest_stage": "Production",
            "aliases": {"production": "1"},
        }
    ]

    rows = list(csv.DictReader(io.StringIO(invoke("models", "list", "--format", "csv").stdout)))
    assert list(rows[0]) == ["name", "latest_version", "latest_stage", "aliases"]
    row = next(r for r in rows if r["name"] == name)
    assert row["latest_version"] == "1" and row["latest_stage"] == "Production"
    assert row["aliases"] == "production=1"

    table = invoke("models", "list").stdout
    assert table.splitlines()[0].split() == ["name", "latest_version", "latest_stage", "aliases"]
    assert any(
        line.split() == [name, "1", "Production", "production=1"] for line in table.splitlines()
    )


def test_plot_across_runs_and_along_steps(
    experiment_name: str,
    runs: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    across = tmp_path / "across.png"
    out = invoke("plot", experiment_name, "--metric", "r2_score", "--output", str(across))
    assert str(across) in out.stdout
    assert across.read_bytes().startswith(PNG_MAGIC)

    steps = tmp_path / "sub" / "steps.png"
    invoke("plot", experiment_name, "--metric", "loss", "--run", "curve", "--output", str(steps))
    assert steps.read_bytes().startswith(PNG_MAGIC)

    monkeypatch.chdir(tmp_path)  # the default output: <experiment>-<metric>.png here
    invoke("plot", experiment_name, "--metric", "rmse")
    assert (tmp_path / f"{experiment_name}-rmse.png").read_bytes().startswith(PNG_MAGIC)

    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(across)).shape
    assert width > 300 and height > 200


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["runs", "best", "{ghost}"], "{ghost}"),
        (["runs", "compare", "{ghost}"], "{ghost}"),
        (["runs", "summary", "{ghost}"], "{ghost}"),
        (["runs", "best", "{exp}", "--metric", "accuracy"], "accuracy"),
        (["plot", "{exp}", "--metric", "accuracy", "--output", "{tmp}/x.png"], "accuracy"),
        (
            ["plot", "{exp}", "--metric", "loss", "--run", "nobody", "--output", "{tmp}/x.png"],
            "nobody",
        ),
        (
            ["plot", "{exp}", "--metric", "accuracy", "--run", "curve", "--output", "{tmp}/x.png"],
            "accuracy",
        ),
    ],
)
def test_errors_name_what_is_missing(
    experiment_name: str, runs: dict[str, str], tmp_path: Path, args: list[str], named: str
) -> None:
    subs = {"ghost": f"{experiment_name}-ghost", "exp": experiment_name, "tmp": str(tmp_path)}
    result = CliRunner().invoke(main, [a.format(**subs) for a in args])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert named.format(**subs) in result.output
    assert result.output.startswith("Error:")
    assert not (tmp_path / "x.png").exists()


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(command: list[str], env: dict[str, str], cwd: Path) -> Any:
    done = subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_as_a_subprocess(
    experiment_name: str, runs: dict[str, str], mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    """``python -m asynctrack.cli`` with --tracking-uri and no MLFLOW_TRACKING_URI; then the
    installed ``asynctrack`` console script with the environment variable."""
    done = _run(
        [
            sys.executable,
            "-m",
            "asynctrack.cli",
            "--tracking-uri",
            mlflow_tracking_uri,
            "runs",
            "compare",
            experiment_name,
            "--format",
            "json",
        ],
        _env(MLFLOW_TRACKING_URI=None),
        tmp_path,
    )
    records = json.loads(done.stdout)
    assert [r["run_id"] for r in records] == [runs["beta"], runs["curve"], runs["alpha"]]

    beside = Path(sys.executable).parent / "asynctrack"
    script = str(beside) if beside.exists() else shutil.which("asynctrack")
    assert script, "the asynctrack console script is not installed"
    done = _run(
        [script, "plot", experiment_name, "--metric", "loss", "--run", "curve"],
        _env(MLFLOW_TRACKING_URI=mlflow_tracking_uri),
        tmp_path,
    )
    png = tmp_path / f"{experiment_name}-loss.png"
    assert f"wrote {png.name}" in done.stdout
    assert png.read_bytes().startswith(PNG_MAGIC)

    failed = subprocess.run(
        [script, "runs", "best", f"{experiment_name}-ghost"],
        env=_env(MLFLOW_TRACKING_URI=mlflow_tracking_uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode == 1
    assert f"{experiment_name}-ghost" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_plot_shows_one_bar_per_run_even_when_names_repeat(
    client: MlflowClient,
    tracker: MLflowExperimentTracker,
    experiment_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = [0.3, 0.6, 0.5]
    for value in values:  # the same script run three times: three runs of the same name
        with tracker.start_run(run_name="rf-optimized"):
            tracker.log_metric("r2_score", value)
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    savefig = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    out = tmp_path / "bars.png"
    invoke("plot", experiment_name, "--metric", "r2_score", "--output", str(out))
    assert out.read_bytes().startswith(PNG_MAGIC)
    (ax,) = figures[0].axes
    bars = ax.patches
    assert sorted(b.get_width() for b in bars) == sorted(values)  # type: ignore[attr-defined]
    # three rows, none drawn over another
    assert len({b.get_y() for b in bars}) == 3  # type: ignore[attr-defined]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(set(labels)) == 3 and all(lbl.startswith("rf-optimized") for lbl in labels)


def test_compare_asked_metrics_fit_a_terminal(
    experiment_name: str, runs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = invoke("runs", "compare", experiment_name, "--metric", "r2_score", "--metric", "rmse")
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "run_id", "run_name", "status", "start_time", "metric_r2_score", "metric_rmse"
    ]  # fmt: skip
    assert max(len(line) for line in lines) <= 80
    assert lines[1].split()[-2:] == ["0.8", "2"]

    wide = invoke("runs", "compare", experiment_name, "--params").stdout
    assert "param_max_depth" in wide
    assert max(len(line) for line in wide.splitlines()) <= 80  # wrapped, not cut


# ------------------------------------------------------------- where the data is, fail fast


@pytest.fixture
def no_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MLFLOW_TRACKING_URI and an empty current directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert result.output.startswith("Error:") and result.output.count("\n") == 1, result.output
    return result


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "compare", "boston-housing"],
        ["runs", "best", "boston-housing"],
        ["runs", "summary", "boston-housing"],
        ["models", "list"],
        ["plot", "boston-housing", "--metric", "r2_score"],
    ],
)
def test_no_uri_is_refused_and_creates_no_store(no_uri: Path, args: list[str]) -> None:
    result = _fails(*args)
    assert "MLFLOW_TRACKING_URI" in result.output and "--tracking-uri" in result.output
    assert "asynctrack demo" in result.output
    assert list(no_uri.iterdir()) == []  # no ./mlflow.db, no mlruns/


def test_no_uri_points_at_the_demo_store_when_there_is_one(no_uri: Path) -> None:
    (no_uri / "asynctrack-demo").mkdir()
    (no_uri / "asynctrack-demo" / "mlflow.db").write_bytes(b"")
    result = _fails("runs", "summary", "boston-housing")
    assert "--tracking-uri asynctrack-demo" in result.output


@pytest.mark.parametrize(
    "uri", ["sqlite:///{tmp}/missing.db", "{tmp}/missing.db", "{tmp}/empty-dir", "{tmp}/x.txt"]
)
def test_a_store_that_is_not_there_is_refused(no_uri: Path, uri: str) -> None:
    (no_uri / "empty-dir").mkdir()
    (no_uri / "x.txt").write_text("not a database")
    result = _fails("runs", "summary", "boston-housing", "--tracking-uri", uri.format(tmp=no_uri))
    assert not (no_uri / "missing.db").exists()
    assert not (no_uri / "empty-dir" / "mlflow.db").exists()
    assert "missing.db" in result.output or "empty-dir" in result.output or "x.txt" in result.output


def test_no_server_fails_within_seconds_naming_the_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    from asynctrack.testing import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for args in (
        ["runs", "summary", "boston-housing"],
        ["models", "list"],
        ["demo", "--store-dir", "unused"],
        ["sync", "--tracking-uri", url],
    ):
        started = time.monotonic()
        result = _fails(*args)
        assert time.monotonic() - started < 10
        assert f"no MLflow server at {url} (connection refused)" in result.output
        assert "mlflow server" in result.output


def test_credentials_stay_out_of_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from asynctrack.testing import free_port

    port = free_port()
    result = _fails("--tracking-uri", f"http://alice:s3cret@127.0.0.1:{port}", "models", "list")
    assert "s3cret" not in result.output and f"http://***@127.0.0.1:{port}" in result.output


def test_tracking_uri_after_the_subcommand_and_paths_to_a_store(
    experiment_name: str, runs: dict[str, str], mlflow_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args in (
        ["runs", "best", experiment_name, "--tracking-uri", mlflow_server.url],
        ["runs", "--tracking-uri", mlflow_server.url, "best", experiment_name],
        ["--tracking-uri", "http://127.0.0.1:9", "runs", "best", experiment_name,
         "--tracking-uri", mlflow_server.url],  # the innermost wins
    ):  # fmt: skip
        out = invoke(*args, "--format", "json").stdout
        assert json.loads(out)["run_id"] == runs["beta"]

    # The server's own store, named by its file and by its directory.
    db = mlflow_server.workdir / "mlflow.db"
    for store in (str(db), str(mlflow_server.workdir), f"sqlite:///{db}"):
        out = invoke("runs", "best", experiment_name, "--tracking-uri", store, "--format", "json")  # type: ignore[assignment]
        assert json.loads(out.stdout)["run_id"] == runs["beta"]  # type: ignore[attr-defined]


def test_status_of_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    result = CliRunner().invoke(main, ["sync", str(tmp_path / "nowhere")])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    "command",
    [
        ["demo"],
        ["runs", "compare"],
        ["runs", "best"],
        ["runs", "summary"],
        ["models", "list"],
        ["plot"],
        ["sync"],
        ["status"],
    ],
)
def test_every_subcommand_takes_tracking_uri(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--tracking-uri", "http://x:1", "--help"])
    assert result.exit_code == 0, result.output
    assert "--tracking-uri" in result.output
