"""``asynctrack demo``: end to end on the embedded store of a fresh directory (no tracking
URI anywhere), then once against the test server with ``--tracking-uri``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.entities import Run

from asynctrack.cli import main

PARENT = "mlflow.parentRunId"
EXPERIMENT = "boston-housing"  # the seed's default experiment name


class Demo(NamedTuple):
    cwd: Path
    store: Path
    stdout: str
    stderr: str
    returncode: int


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One run of ``asynctrack demo --store-dir <tmp>/store`` from another directory, with
    no MLflow configuration in the environment."""
    cwd = tmp_path_factory.mktemp("demo")
    store = cwd / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        beside = Path(sys.executable).parent / "asynctrack"
        command = [str(beside)] if beside.exists() else [sys.executable, "-m", "asynctrack.cli"]
        done = subprocess.run(
            [*command, "demo", "--store-dir", str(store)],
            cwd=cwd,
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    yield Demo(cwd, store, done.stdout, done.stderr, done.returncode)


@pytest.fixture(scope="module")
def store_runs(demo: Demo) -> dict[str, Run]:
    assert demo.returncode == 0, demo.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{demo.store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} in the demo's store"
    runs = list(client.search_runs([experiment.experiment_id], max_results=1000))
    by_name = {r.info.run_name: r for r in runs}
    assert len(by_name) == len(runs), "run names repeat"
    return by_name


def test_demo_exits_cleanly_and_prints_what_to_do_next(demo: Demo) -> None:
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "Traceback" not in demo.stderr
    db = demo.store / "mlflow.db"
    assert db.is_file() and db.stat().st_size > 0
    uri = f"sqlite:///{db.resolve()}"
    assert f"Tracking to {uri}" in demo.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in demo.stdout
    assert f"export MLFLOW_TRACKING_URI={uri}" in demo.stdout
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):  # progress while it works
        assert step in demo.stdout


def test_demo_store_holds_what_it_claims(demo: Demo, store_runs: dict[str, Run]) -> None:
    claimed = re.search(
        r"(\d+) runs \((\d+) finished, (\d+) failed\).*; (\d+) events stored", demo.stdout
    )
    assert claimed, demo.stdout
    assert int(claimed.group(1)) == len(store_runs) == 18
    assert int(claimed.group(2)) == 18 and int(claimed.group(3)) == 0
    assert int(claimed.group(4)) > 600  # the two 300-step curves and the rest
    assert {r.info.status for r in store_runs.values()} == {"FINISHED"}

    gb = store_runs["gb-optimized"]
    assert gb.data.params == {
        "n_estimators": "300", "max_depth": "2", "learning_rate": "0.02", "subsample": "0.5"
    }  # fmt: skip
    assert {"model_type": "GradientBoosting", "stage": "optimization"}.items() <= (
        gb.data.tags.items()
    )
    assert {"r2_score", "rmse", "mae", "train_loss", "test_loss"} == set(gb.data.metrics)
    assert 0 < gb.data.metrics["r2_score"] < 1 and gb.data.metrics["rmse"] > 0

    rf = store_runs["rf-experiment"]
    assert rf.data.params == {"n_estimators": "200", "max_depth": "15", "min_samples_split": "5"}
    assert {"r2_score", "rmse", "mae", "duration_seconds"} == set(rf.data.metrics)
    assert 0 < rf.data.metrics["r2_score"] < gb.data.metrics["r2_score"]

    cv = store_runs["rf-cv"]
    assert cv.data.params == {"model": "RandomForest", "cv_folds": "5"}
    folds = {n: r for n, r in store_runs.items() if r.data.tags.get(PARENT) == cv.info.run_id}
    assert sorted(folds) == [f"fold-{i}" for i in range(5)]
    scores = [folds[f"fold-{i}"].data.metrics["fold_score"] for i in range(5)]
    mean = sum(scores) / 5
    std = (sum((s - mean) ** 2 for s in scores) / 5) ** 0.5
    assert cv.data.metrics["mean_cv_score"] == pytest.approx(mean)
    assert cv.data.metrics["std_cv_score"] == pytest.approx(std)
    for name in ("gb-optimized", "rf-experiment", "rf-cv", "rf-grid"):
        assert PARENT not in store_runs[name].data.tags

    grid = store_runs["rf-grid"]
    children = [r for r in store_runs.values() if r.data.tags.get(PARENT) == grid.info.run_id]
    assert len(children) == 9
    best = max(children, key=lambda r: r.data.metrics["r2_score"])
    assert grid.data.metrics["best_r2_score"] == best.data.metrics["r2_score"]
    assert grid.data.params["best_n_estimators"] == best.data.params["n_estimators"]


def test_demo_logs_curves_along_steps(demo: Demo, store_runs: dict[str, Run]) -> None:
    """Per-iteration train and test loss: lines in MLflow's charts and in `plot --run`."""
    client = MlflowClient(tracking_uri=f"sqlite:///{demo.store / 'mlflow.db'}")
    gb = store_runs["gb-optimized"]
    for key in ("train_loss", "test_loss"):
        history = sorted(client.get_metric_history(gb.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, 301))
        assert history[-1].value < history[0].value / 1.5  # it learns
        assert gb.data.metrics[key] == history[-1].value  # the run shows the last step


def test_demo_is_deterministic(demo: Demo, store_runs: dict[str, Run]) -> None:
    """The same numbers as a second, in-process run of the seeded pipeline would log."""
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.model_selection import train_test_split

    from asynctrack.demo import SEED

    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=SEED)
    gb = GradientBoostingRegressor(
        n_estimators=300, max_depth=2, learning_rate=0.02, subsample=0.5, random_state=SEED
    ).fit(X_train, y_train)
    rf = RandomForestRegressor(
        n_estimators=200, max_depth=15, min_samples_split=5, random_state=SEED, n_jobs=-1
    ).fit(X_train, y_train)
    logged = store_runs["gb-optimized"].data.metrics["r2_score"]
    assert logged == pytest.approx(gb.score(X_test, y_test), abs=1e-12)
    logged = store_runs["rf-experiment"].data.metrics["r2_score"]
    assert logged == pytest.approx(rf.score(X_test, y_test), abs=1e-12)


def test_demo_registers_the_run_it_ranks_best_and_says_why(
    demo: Demo, store_runs: dict[str, Run]
) -> None:
    import mlflow

    uri = f"sqlite:///{(demo.store / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    gb, grid = store_runs["gb-optimized"], store_runs["rf-grid"]
    assert [f.path for f in client.list_artifacts(gb.info.run_id, "plots")] == [
        "plots/residuals.png"
    ]
    assert "param_grid.json" in [f.path for f in client.list_artifacts(grid.info.run_id)]
    name = f"{EXPERIMENT}-production"
    version = client.get_model_version_by_alias(name, "production")
    assert version.current_stage == "Production"
    # The best r2_score of the runs with a model, and the top of the demo's table.
    with_model = {"gb-optimized", "rf-experiment"}
    best = max(with_model, key=lambda n: store_runs[n].data.metrics["r2_score"])
    assert version.run_id == store_runs[best].info.run_id
    top = max(store_runs.values(), key=lambda r: r.data.metrics.get("r2_score", -1))
    assert top.info.run_name == best
    said = re.search(
        rf"Registered {name} version {version.version} from run (\S+): (.*)", demo.stdout
    )
    assert said, demo.stdout
    assert said.group(1) == best
    assert "best r2_score" in said.group(2) and "rf-experiment" in said.group(2)
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.sklearn.load_model(f"models:/{name}@production")
    finally:
        mlflow.set_tracking_uri(None)
    assert hasattr(model, "predict")


def test_after_the_demo_the_cli_reads_its_store(
    demo: Demo, store_runs: dict[str, Run], tmp_path: Path
) -> None:
    """The commands the demo prints, as printed."""
    lines = [ln.strip() for ln in demo.stdout.splitlines()]
    export = next(ln for ln in lines if ln.startswith("export MLFLOW_TRACKING_URI="))
    env = {**os.environ, "MLFLOW_TRACKING_URI": export.partition("=")[2]}
    beside = Path(sys.executable).parent / "asynctrack"
    for line in (ln for ln in lines if ln.startswith("asynctrack ")):
        done = subprocess.run(
            [str(beside), *line.split()[1:]],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (line, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
    assert (tmp_path / f"{EXPERIMENT}-test_loss.png").read_bytes().startswith(b"\x89PNG")


def test_demo_keeps_its_artifacts_in_the_store_dir(demo: Demo, store_runs: dict[str, Run]) -> None:
    """The embedded store is the sqlite database *and* a local artifact folder in the
    directory the demo names; nothing lands in the directory it was started from."""
    store = demo.store.resolve()
    for run in store_runs.values():
        location = run.info.artifact_uri.removeprefix("file://")
        assert Path(location).resolve().is_relative_to(store), run.info.artifact_uri
    assert [p.name for p in demo.cwd.iterdir()] == ["store"]


def test_demo_against_a_server(
    client: MlflowClient, experiment_name: str, mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    """``--tracking-uri`` wins over the embedded store: the runs land on the server and no
    store directory is made."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    try:
        result = CliRunner().invoke(
            main,
            [
                "--tracking-uri",
                mlflow_tracking_uri,
                "demo",
                "--experiment",
                experiment_name,
                "--store-dir",
                str(tmp_path / "unused"),
            ],
        )
    finally:
        utils._tracking_uri = before
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"Tracking to {mlflow_tracking_uri}" in result.stdout
    assert "mlflow ui" not in result.stdout
    assert not (tmp_path / "unused").exists()
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    grid = [f"n{n}_d{d}" for n in (100, 200, 300) for d in (5, 10, 15)]
    folds = [f"fold-{i}" for i in range(5)]
    assert names == sorted(["gb-optimized", "rf-experiment", "rf-cv", "rf-grid", *folds, *grid])
