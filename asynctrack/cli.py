"""The ``asynctrack`` command: the demo, run queries, the model registry, plots, and the
spool's crash recovery (``sync``, ``status``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from asynctrack import config

_FORMATS = click.Choice(["table", "csv", "json"])


class _Group(click.Group):
    """Reports a missing experiment, run, metric or model as an error message, not a
    traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LookupError as exc:
            if type(exc) is not LookupError:  # KeyError, IndexError: bugs keep their traceback
                raise
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group)
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="The MLflow tracking server or store (default: MLFLOW_TRACKING_URI).",
)
def main(tracking_uri: str | None) -> None:
    """asynctrack: MLflow tracking that costs the training loop nothing."""
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)


@main.command()
@click.option("--experiment", default=config.MLFLOW_EXPERIMENT_NAME, show_default=True)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("asynctrack-demo"),
    show_default=True,
    help="Where the embedded store lives when no tracking URI is configured.",
)
@click.pass_context
def demo(ctx: click.Context, experiment: str, store_dir: Path) -> None:
    """Run the seed's pipeline on scikit-learn's diabetes data."""
    from asynctrack.demo import run_demo

    tracking_uri = ctx.parent.params.get("tracking_uri") if ctx.parent else None
    run_demo(experiment, tracking_uri, store_dir, say=click.echo)


@main.group()
def runs() -> None:
    """Query the runs of an experiment."""


def _emit(data: Any, fmt: str) -> None:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if fmt == "csv":
            click.echo(data.to_csv(index=False), nl=False)
        elif fmt == "json":
            click.echo(data.to_json(orient="records", date_format="iso"))
        else:
            click.echo(data.to_string(index=False) if not data.empty else "(nothing)")
        return
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, default=str))
        return
    rows = _flatten(data)
    if fmt == "csv":
        click.echo("key,value")
        for key, value in rows:
            click.echo(f"{key},{value}")
    else:
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            click.echo(f"{key:<{width}}  {value}")


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out.extend(_flatten(value, f"{prefix}{key}."))
        return out
    return [(prefix.rstrip("."), data)]


@runs.command("compare")
@click.argument("experiment")
@click.option("--metric", "metrics", multiple=True, help="A metric to show (repeatable).")
@click.option("--top-n", default=10, show_default=True)
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
def runs_compare(experiment: str, metrics: tuple[str, ...], top_n: int, fmt: str) -> None:
    """The best runs side by side, sorted by the first metric."""
    from asynctrack.utils import compare_runs

    _emit(compare_runs(experiment, list(metrics) or None, top_n), fmt)


@runs.command("best")
@click.argument("experiment")
@click.option("--metric", default="r2_score", show_default=True)
@click.option("--ascending", is_flag=True, help="Lower is better (rmse, loss...).")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
def runs_best(experiment: str, metric: str, ascending: bool, fmt: str) -> None:
    """The best run by a metric."""
    from asynctrack.utils import get_best_run

    _emit(get_best_run(experiment, metric, ascending), fmt)


@runs.command("summary")
@click.argument("experiment")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
def runs_summary(experiment: str, fmt: str) -> None:
    """Counts by status and figures for every metric."""
    from asynctrack.utils import get_experiment_summary

    _emit(get_experiment_summary(experiment), fmt)


@main.group()
def models() -> None:
    """The model registry."""


@models.command("list")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
def models_list(fmt: str) -> None:
    """Every registered model with its latest version, stage and aliases."""
    from asynctrack.utils import list_registered_models

    _emit(list_registered_models(), fmt)


@main.command()
@click.argument("experiment")
@click.option("--metric", required=True, help="The metric to plot.")
@click.option("--run", "run_name", default=None, help="One run's name: plot along its steps.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The PNG to write (default: <experiment>-<metric>.png).",
)
def plot(experiment: str, metric: str, run_name: str | None, output: Path | None) -> None:
    """A PNG of a metric across runs, or along the steps of one run."""
    from asynctrack.plotting import plot_metric

    output = output or Path(f"{experiment}-{metric}.png".replace("/", "_"))
    plot_metric(experiment, metric, output, run_name)
    click.echo(f"wrote {output}")


def _spool_root(spool_dir: Path | None) -> Path:
    if spool_dir is not None:
        return spool_dir
    from asynctrack._engine import spool
    from asynctrack.errors import ConfigError

    try:
        configured = config.EngineConfig.resolve().spool_dir
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return Path(configured) if configured else spool.default_root()


_SPOOL_DIR = click.argument(
    "spool_dir", required=False, type=click.Path(file_okay=False, path_type=Path)
)


@main.command()
@_SPOOL_DIR
@click.option(
    "--status",
    "end_status",
    type=click.Choice(["FAILED", "FINISHED", "KILLED", "none"], case_sensitive=False),
    default="FAILED",
    show_default=True,
    help="End runs whose process died before ending them with this status if the server "
    "still shows them RUNNING (none: leave them RUNNING).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds to keep retrying while the server does not answer; what is not sent by "
    "then stays in the spool.",
)
@click.pass_context
def sync(ctx: click.Context, spool_dir: Path | None, end_status: str, timeout: float) -> None:
    """Send what crashed processes left in the spool (SPOOL_DIR: the spool root or one
    writer's directory; default: the configured spool). Exits 1 unless all was stored."""
    from click.core import ParameterSource

    from asynctrack._engine import replay

    root = _spool_root(spool_dir)
    # Each directory names the server its events belong to; only an explicit --tracking-uri
    # overrides it, not an MLFLOW_TRACKING_URI that happens to be set.
    override = None
    if (
        ctx.parent
        and ctx.parent.get_parameter_source("tracking_uri") == ParameterSource.COMMANDLINE
    ):
        override = ctx.parent.params.get("tracking_uri")
    found = replay.status(root)
    waiting = sum(d.events for d in found if not d.alive)
    end = None if end_status.lower() == "none" else end_status.upper()
    if not found:
        click.echo(f"nothing waiting in {root}")
        return
    # a bar on a terminal; elsewhere (a log) click shows the label once
    with click.progressbar(
        length=max(waiting, 1),
        label=f"replaying {waiting} events from {root}",
        file=sys.stderr,
    ) as bar:
        report = replay.replay(
            root, status=end, tracking_uri=override, timeout=timeout, progress=bar.update
        )
    refused = len(report.refused)
    reasons = sorted({r.reason for r in report.refused})[:3]
    click.echo(
        f"stored {report.stored} events, refused {refused}"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + f", {report.left} left"
    )
    for rejection in report.refused[:10]:
        click.echo(f"  refused: {rejection}")
    if refused > 10:
        click.echo(f"  ... and {refused - 10} more")
    if report.ended_runs:
        click.echo(f"runs ended {end} (their process died first): {', '.join(report.ended_runs)}")
    if report.open_runs:
        click.echo(f"runs left RUNNING (no end recorded): {', '.join(report.open_runs)}")
    for line in report.damaged:
        click.echo(f"damaged: {line}")
    for line in report.skipped:
        click.echo(f"skipped: {line}")
    for line in report.errors:
        click.echo(f"error: {line}", err=True)
    if not report.ok:
        ctx.exit(1)


@main.command()
@_SPOOL_DIR
def status(spool_dir: Path | None) -> None:
    """What the spool holds, one line per writer directory (SPOOL_DIR: default the
    configured spool)."""
    import time

    from asynctrack._engine import replay

    root = _spool_root(spool_dir)
    found = replay.status(root)
    if not found:
        click.echo(f"nothing waiting in {root}")
        return
    click.echo(f"spool: {root}")
    rows = [("directory", "pid", "host", "state", "segments", "bytes", "events", "since", "runs")]
    for d in found:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.since)) if d.since else "-"
        runs = ", ".join(d.runs[:3]) + (f" (+{len(d.runs) - 3})" if len(d.runs) > 3 else "")
        state = "writing" if d.alive else "dead"
        rows.append((d.directory.name, str(d.pid or "?"), d.host, state, str(d.segments),
                     str(d.bytes), str(d.events), since, runs or "-"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo(
            "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        )
    for d in found:
        for damage in d.damage:
            click.echo(f"damaged: {d.directory.name}/{damage}")


if __name__ == "__main__":
    main()


from asynctrack._mlflow.launcher import run as _run_command  # noqa: E402

main.add_command(_run_command)
