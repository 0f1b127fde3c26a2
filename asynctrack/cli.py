"""The ``asynctrack`` command: the demo, run queries, the model registry, plots, and the
spool's crash recovery (``sync``, ``status``)."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from asynctrack import config
from asynctrack._mlflow.launcher import run as run_command
from asynctrack.errors import summarize

_FORMATS = click.Choice(["table", "csv", "json"])
F = TypeVar("F", bound=Callable[..., Any])

#: How long a command waits for a server's /health before it gives up.
CHECK_TIMEOUT = 5.0
_DEMO_DIR = "asynctrack-demo"
_URI_KEY = "asynctrack.tracking_uri"
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _redact(text: str) -> str:
    """Drop credentials written into URLs (``https://user:secret@host``)."""
    from asynctrack._engine.transport import redact

    return redact(text)


class _Group(click.Group):
    """Reports a missing experiment, run, metric or model, and what the tracking server or
    store refused, as one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LookupError as exc:
            if type(exc) is not LookupError:  # KeyError, IndexError: bugs keep their traceback
                raise
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            from mlflow.exceptions import MlflowException

            if not isinstance(exc, MlflowException):
                raise
            first = (str(exc.message).strip().splitlines() or ["(no message)"])[0]
            uri = ctx.meta.get(_URI_KEY, (None, False))[0]
            where = f" ({_redact(uri)})" if uri else ""
            raise click.ClickException(f"MLflow{where}: {_redact(first)[:300]}") from None


def _remember_uri(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # ctx.meta is shared by a command and its subcommands: the innermost one given wins.
    if value:
        explicit = ctx.get_parameter_source(str(param.name)) == ParameterSource.COMMANDLINE
        ctx.meta[_URI_KEY] = (value, explicit)


def _uri_option(envvar: str | None = None) -> Callable[[F], F]:
    """``--tracking-uri``, accepted before the subcommand and on every subcommand."""
    return click.option(
        "--tracking-uri",
        envvar=envvar,
        default=None,
        expose_value=False,
        callback=_remember_uri,
        help="The MLflow server URL or store URI, or a path to a .db file or to the demo's "
        "directory (default: MLFLOW_TRACKING_URI).",
    )


def _demo_hint() -> str:
    if (Path(_DEMO_DIR) / "mlflow.db").is_file():
        return f"or use the demo's store: --tracking-uri {_DEMO_DIR}"
    return "or run `asynctrack demo` for a local store to explore"


def _as_store_uri(raw: str, create: bool) -> str:
    """A URI as MLflow takes it; a path to a .db file or a directory holding ``mlflow.db``
    becomes ``sqlite:///...``. Refuses what would quietly create an empty store."""
    if "://" in raw or raw == "databricks" or raw.startswith("databricks:"):
        if raw.startswith("sqlite:///") and not create:
            db = Path(urllib.parse.unquote(raw.removeprefix("sqlite:///").split("?")[0]))
            if not db.is_file():
                raise click.ClickException(
                    f"no MLflow store at {db} (MLflow would create an empty one); "
                    f"check the path, {_demo_hint()}"
                )
        return raw
    path = Path(raw).expanduser()
    if path.is_dir() and ((path / "mlflow.db").is_file() or create):
        return f"sqlite:///{path.resolve() / 'mlflow.db'}"
    if path.is_file():
        with path.open("rb") as f:
            if f.read(16) != _SQLITE_MAGIC:
                raise click.ClickException(f"{path} is not an MLflow SQLite store")
        return f"sqlite:///{path.resolve()}"
    if create and path.suffix == ".db":
        return f"sqlite:///{path.resolve()}"
    what = "holds no mlflow.db" if path.is_dir() else "does not exist"
    raise click.ClickException(
        f"{raw} {what}: give a server URL, a .db file or the demo's directory, {_demo_hint()}"
    )


def check_server(uri: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Fail within ``timeout`` seconds, in one line, when no MLflow server answers at an
    http(s) ``uri`` (MLflow's own client would retry for minutes)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    shown = _redact(uri)
    # Credentials stay out of the request line: /health needs none.
    netloc = parts.netloc.rpartition("@")[2]
    health = urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")
    )
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500 and exc.code != 404:  # an auth proxy may guard /health: go on
            return
        reason = f"/health answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        cause = getattr(exc, "reason", exc)
        if isinstance(cause, ConnectionRefusedError):
            reason = "connection refused"
        elif isinstance(cause, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        else:
            reason = _redact(str(cause))
    raise click.ClickException(
        f"no MLflow server at {shown} ({reason}). Start it (mlflow server --host 127.0.0.1 "
        f"--port {parts.port or 5000}), point MLFLOW_TRACKING_URI or --tracking-uri at yours, "
        f"{_demo_hint()}"
    )


def _connect(ctx: click.Context) -> str:
    """The tracking URI this command uses, checked, and set as MLflow's."""
    import mlflow

    raw = ctx.meta.get(_URI_KEY, (None, False))[0]
    if raw is None:
        raise click.ClickException(
            "no tracking URI (asynctrack will not create ./mlflow.db here): set "
            "MLFLOW_TRACKING_URI or pass --tracking-uri with a server URL, a .db file or the "
            f"demo's directory, {_demo_hint()}"
        )
    uri = _as_store_uri(raw, create=False)
    check_server(uri)
    ctx.meta[_URI_KEY] = (uri, ctx.meta[_URI_KEY][1])
    mlflow.set_tracking_uri(uri)
    return uri


@click.group(cls=_Group)
@_uri_option(envvar="MLFLOW_TRACKING_URI")
def main() -> None:
    """asynctrack: MLflow tracking that costs the training loop nothing.

    Every command that reads runs takes --tracking-uri (before or after its name): a
    server URL, or the demo's store, e.g. `--tracking-uri asynctrack-demo`.
    """


@main.command()
@click.option("--experiment", default=config.MLFLOW_EXPERIMENT_NAME, show_default=True)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(_DEMO_DIR),
    show_default=True,
    help="Where the embedded store lives when no tracking URI is configured.",
)
@_uri_option()
@click.pass_context
def demo(ctx: click.Context, experiment: str, store_dir: Path) -> None:
    """Run the pipeline of the original specification on scikit-learn's diabetes data.

    With no tracking URI it writes a local store in --store-dir; given one (a server URL,
    a .db file), it checks it first."""
    from asynctrack.demo import run_demo

    raw = ctx.meta.get(_URI_KEY, (None, False))[0]
    uri = None
    if raw is not None:
        uri = _as_store_uri(raw, create=True)
        check_server(uri)
    run_demo(experiment, uri, store_dir, say=click.echo)


@main.group()
@_uri_option()
def runs() -> None:
    """Query the runs of an experiment."""


def _emit(data: Any, fmt: str) -> None:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if fmt == "csv":
            click.echo(_cells(data, _csv_cell).to_csv(index=False), nl=False)
        elif fmt == "json":
            click.echo(data.to_json(orient="records", date_format="iso"))
        elif data.empty:
            click.echo("(nothing)")
        else:
            width = shutil.get_terminal_size((120, 24)).columns
            text = _cells(data, _table_cell).to_string(index=False, line_width=width)
            click.echo(text)
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


def _cells(data: Any, cell: Callable[[str, Any], Any]) -> Any:
    return data.apply(lambda col: col.map(lambda v: cell(str(col.name), v)))


def _csv_cell(column: str, value: Any) -> Any:
    if isinstance(value, dict):  # aliases: production=1;staging=2
        return ";".join(f"{k}={v}" for k, v in value.items())
    return value


def _table_cell(column: str, value: Any) -> str:
    """Short forms that keep a table within a terminal's width; CSV and JSON keep all."""
    import pandas as pd

    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if column == "run_id":
        return str(value)[:8]
    if isinstance(value, pd.Timestamp):
        return str(value.strftime("%Y-%m-%d %H:%M"))
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:59] + "~"


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out.extend(_flatten(value, f"{prefix}{key}."))
        return out
    return [(prefix.rstrip("."), data)]


@runs.command("compare")
@click.argument("experiment")
@click.option("--metric", "metrics", multiple=True, help="A metric to show (repeatable; "
              "default: every metric). The first one sorts, highest first.")  # fmt: skip
@click.option("--params", "with_params", is_flag=True, help="Also show the runs' params.")
@click.option("--top-n", default=10, show_default=True)
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
@_uri_option()
@click.pass_context
def runs_compare(
    ctx: click.Context,
    experiment: str,
    metrics: tuple[str, ...],
    with_params: bool,
    top_n: int,
    fmt: str,
) -> None:
    """The best runs side by side, sorted by the first metric. Tables show the first 8
    characters of run ids; --format csv or json gives them whole."""
    from asynctrack.utils import compare_runs

    _connect(ctx)
    table = compare_runs(experiment, list(metrics) or None, top_n)
    params = [c for c in table.columns if c.startswith("param_")]
    if with_params:  # only the params the runs shown have
        table = table.drop(columns=[c for c in params if table[c].isna().all()])
    else:
        table = table.drop(columns=params)
    _emit(table, fmt)


@runs.command("best")
@click.argument("experiment")
@click.option("--metric", default="r2_score", show_default=True)
@click.option("--ascending", is_flag=True, help="Lower is better (rmse, loss...).")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
@_uri_option()
@click.pass_context
def runs_best(ctx: click.Context, experiment: str, metric: str, ascending: bool, fmt: str) -> None:
    """The best run by a metric."""
    from asynctrack.utils import get_best_run

    _connect(ctx)
    _emit(get_best_run(experiment, metric, ascending), fmt)


@runs.command("summary")
@click.argument("experiment")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
@_uri_option()
@click.pass_context
def runs_summary(ctx: click.Context, experiment: str, fmt: str) -> None:
    """Counts by status and figures for every metric."""
    from asynctrack.utils import get_experiment_summary

    _connect(ctx)
    _emit(get_experiment_summary(experiment), fmt)


@main.group()
@_uri_option()
def models() -> None:
    """The model registry."""


@models.command("list")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
@_uri_option()
@click.pass_context
def models_list(ctx: click.Context, fmt: str) -> None:
    """Every registered model with its latest version, stage and aliases (name=version)."""
    from asynctrack.utils import list_registered_models

    _connect(ctx)
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
@_uri_option()
@click.pass_context
def plot(
    ctx: click.Context, experiment: str, metric: str, run_name: str | None, output: Path | None
) -> None:
    """A PNG of a metric across runs, or along the steps of one run."""
    from asynctrack.plotting import plot_metric

    _connect(ctx)
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
    "spool_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
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
@click.option(
    "--discard",
    is_flag=True,
    help="Do not send: delete what waits in SPOOL_DIR (its events and staged files), "
    "after listing it.",
)
@_uri_option()
@click.pass_context
def sync(
    ctx: click.Context, spool_dir: Path | None, end_status: str, timeout: float, discard: bool
) -> None:
    """Send what crashed processes left in the spool (SPOOL_DIR: the spool root or one
    writer's directory; default: the configured spool). Exits 1 unless all was stored:
    what a server refuses for credentials or permissions stays for the next sync."""
    from asynctrack._engine import replay

    root = _spool_root(spool_dir)
    if discard:
        for dropped in replay.discard(root):
            runs = ", ".join(dropped.runs[:5]) + (" ..." if len(dropped.runs) > 5 else "")
            click.echo(f"discarded {dropped.events} events of runs {runs} from {dropped.directory}")
        return
    # Each directory names the server its events belong to; only an explicit --tracking-uri
    # overrides it, not an MLFLOW_TRACKING_URI that happens to be set.
    raw, explicit = ctx.meta.get(_URI_KEY, (None, False))
    override = None
    if raw is not None and explicit:
        override = _as_store_uri(raw, create=False)
        check_server(override)
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
    kept = sum(k.count for k in report.kept)
    reasons = sorted({r.reason for r in report.refused})[:3]
    click.echo(
        f"stored {report.stored} events, refused {refused}"
        + (f" ({'; '.join(reasons)})" if reasons else "")
        + f", {report.left + kept} left"
        + (f", {len(report.lost)} lost (staged copies gone)" if report.lost else "")
    )
    if len(report.directories) > 1:  # one line per dead process's directory
        for line in report.directories:
            click.echo(f"  {line}")
    for held in report.kept:
        click.echo(
            f"  kept: {held.count} events for {held.server} ({held.reason}) stay in "
            f"{held.where}: sync again once the credentials or permissions are fixed "
            "(or drop them with --discard)"
        )
    for line in summarize(report.refused):
        click.echo(f"  refused: {line}")
    if report.ended_runs:
        click.echo(f"runs ended {end} (their process died first): {', '.join(report.ended_runs)}")
    if report.open_runs:
        click.echo(f"runs left RUNNING (no end recorded): {', '.join(report.open_runs)}")
    for line in report.damaged:
        click.echo(f"damaged: {line}")
    for line in report.lost:
        click.echo(f"lost: {line}")
    for line in report.skipped:
        click.echo(f"skipped: {line}")
    for line in report.errors:
        click.echo(f"error: {line}", err=True)
    if not report.ok:
        ctx.exit(1)


@main.command()
@_SPOOL_DIR
@_uri_option()
def status(spool_dir: Path | None) -> None:
    """What the spool holds, one line per writer directory (SPOOL_DIR: default the
    configured spool). It reads only the local disk: --tracking-uri is accepted, unused."""
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
        if d.mlflow_path:
            click.echo(f"MLflow's HTTP client: {d.directory.name} ({d.mlflow_path})")


main.add_command(run_command)

if __name__ == "__main__":
    main()
