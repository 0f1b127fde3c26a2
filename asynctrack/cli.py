"""The ``asynctrack`` command."""

from __future__ import annotations

from pathlib import Path

import click

from asynctrack import config


@click.group()
def main() -> None:
    """asynctrack: MLflow tracking that costs the training loop nothing."""


@main.command()
@click.option("--tracking-uri", default=None, help="An MLflow server; default: a local store.")
@click.option("--experiment", default=config.MLFLOW_EXPERIMENT_NAME, show_default=True)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("asynctrack-demo"),
    show_default=True,
    help="Where the embedded store lives when no server is configured.",
)
def demo(tracking_uri: str | None, experiment: str, store_dir: Path) -> None:
    """Run the seed's pipeline on scikit-learn's diabetes data."""
    from asynctrack.demo import run_demo

    run_demo(experiment, tracking_uri, store_dir, say=click.echo)


if __name__ == "__main__":
    main()
