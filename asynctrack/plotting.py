"""``asynctrack plot``: a metric across runs, or along one run's steps, as a PNG."""

from __future__ import annotations

from pathlib import Path

from asynctrack import utils


def plot_metric(experiment: str, metric: str, output: Path, run_name: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    fig, ax = plt.subplots(figsize=(9, 4.5))
    if run_name is not None:
        run = utils.get_run_by_name(experiment, run_name)
        if run is None:
            raise LookupError(f"experiment {experiment!r} has no run named {run_name!r}")
        history = MlflowClient().get_metric_history(run["run_id"], metric)
        if not history:
            raise LookupError(f"run {run_name!r} has no metric {metric!r}")
        history.sort(key=lambda m: (m.step, m.timestamp))
        ax.plot([m.step for m in history], [m.value for m in history], marker=".")
        ax.set_xlabel("step")
        ax.set_title(f"{metric} of run {run_name} ({experiment})")
    else:
        table = utils.compare_runs(experiment, [metric], top_n=10_000)
        table = table.dropna(subset=[f"metric_{metric}"]).iloc[::-1]
        names = [str(n or i)[:40] for n, i in zip(table["run_name"], table["run_id"], strict=True)]
        repeated = {n for n in names if names.count(n) > 1}  # one bar each, not one per name
        labels = [
            f"{n} ({i[:8]})" if n in repeated else n
            for n, i in zip(names, table["run_id"], strict=True)
        ]
        ax.barh(labels, table[f"metric_{metric}"])
        ax.set_xlabel(metric)
        ax.set_title(f"{metric} across runs of {experiment}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
