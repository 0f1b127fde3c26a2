"""The trackers' artifact and model methods (a mixin of MLflowExperimentTracker).

Each method checks its arguments, captures its input into the staging area (a copy of the
file, the dict serialised, the figure rendered, the model saved) and returns; the engine's
worker stores it. A missing file raises ``FileNotFoundError`` and a path leaving the run's
artifact root raises ``ValueError`` at the call; failures to store are reported by the next
``flush()`` or the run's end, naming the file and the reason. They are plain methods that
never wait on the network, so ``async`` code calls them as they are.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asynctrack._artifacts import staging
from asynctrack._artifacts.paths import check_artifact_dir, check_artifact_file, join
from asynctrack._artifacts.upload import queue_files

if TYPE_CHECKING:
    from types import ModuleType

    from asynctrack._artifacts.models import LoggedModelHandle
    from asynctrack._runs import Run, RunSource


class ArtifactMethods:
    """``log_artifact``, ``log_artifacts``, ``log_dict``, ``log_text``, ``log_figure`` and
    ``log_model``, for the tracker's active run."""

    if TYPE_CHECKING:
        _run_var: RunSource

        def _active(self) -> Run: ...

    def _artifact_run(self) -> Run:
        return self._run_var.get() or self._active()

    def log_artifact(
        self, local_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Store the file as it is now under ``artifact_path`` (a run-relative folder)."""
        run = self._artifact_run()
        directory = check_artifact_dir(artifact_path)
        source = os.fspath(local_path)
        if os.path.isdir(source):
            raise IsADirectoryError(
                errno.EISDIR, "log_artifact takes a file; use log_artifacts for a folder", source
            )
        if not os.path.exists(source):
            raise FileNotFoundError(errno.ENOENT, "no file to log as an artifact", source)
        dest = join(directory, os.path.basename(source))
        _capture(run, "artifact", dest, lambda area: [staging.stage_file(area, source, dest)])

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Store every file under ``local_dir`` (subfolders kept) as it is now."""
        run = self._artifact_run()
        directory = check_artifact_dir(artifact_path)
        source = os.fspath(local_dir)
        if not os.path.isdir(source):
            if os.path.exists(source):
                raise NotADirectoryError(
                    errno.ENOTDIR, "log_artifacts takes a folder; use log_artifact", source
                )
            raise FileNotFoundError(errno.ENOENT, "no folder to log as artifacts", source)
        label = (directory or ".") + "/"
        _capture(run, "artifact", label, lambda area: staging.stage_tree(area, source, directory))

    def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        """Store ``dictionary`` as YAML (``.yaml``/``.yml``) or JSON (anything else),
        serialised now, as MLflow's ``log_dict`` writes it."""
        run = self._artifact_run()
        directory, name = check_artifact_file(artifact_file)
        dest = join(directory, name)

        def write(path: Path) -> None:
            with open(path, "w") as f:
                if os.path.splitext(name)[1] in (".yml", ".yaml"):
                    import yaml  # type: ignore[import-untyped, unused-ignore]

                    yaml.dump(dictionary, f, indent=2, default_flow_style=False)
                else:
                    json.dump(dictionary, f, indent=2, default=str)

        source = f"log_dict({artifact_file!r})"
        _capture(run, "artifact", dest, lambda area: [_write_staged(area, dest, write, source)])

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` (UTF-8) as ``artifact_file``."""
        run = self._artifact_run()
        directory, name = check_artifact_file(artifact_file)
        dest = join(directory, name)

        def write(path: Path) -> None:
            path.write_text(text, encoding="utf-8")

        source = f"log_text({artifact_file!r})"
        _capture(run, "artifact", dest, lambda area: [_write_staged(area, dest, write, source)])

    def log_figure(
        self, figure: Any, artifact_file: str, *, save_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Store a matplotlib or plotly figure, rendered now, in the format the extension
        of ``artifact_file`` names (plotly: ``.html``, or an image through kaleido)."""
        run = self._artifact_run()
        directory, name = check_artifact_file(artifact_file)
        dest = join(directory, name)
        render = _renderer(figure, name, dict(save_kwargs or {}))
        source = f"log_figure({artifact_file!r})"
        _capture(run, "artifact", dest, lambda area: [_write_staged(area, dest, render, source)])

    def log_model(
        self,
        model: Any,
        artifact_path: str = "model",
        input_example: Any = None,
        registered_model_name: str | None = None,
        *,
        name: str | None = None,
        flavor: ModuleType | None = None,
        **kwargs: Any,
    ) -> LoggedModelHandle:
        """Save ``model`` now; log it in the background as an MLflow 3 logged model of the
        run, loadable from ``runs:/<run_id>/<artifact_path>`` and ``models:/m-...``.

        ``input_example`` gives the signature; with ``registered_model_name`` a model
        version is created once the files are stored. ``flavor`` is an MLflow flavor
        module (default ``mlflow.sklearn``); other keywords (``signature``, ``params``,
        ``tags``, ``pip_requirements``, ``serialization_format``, ``skops_trusted_types``,
        ...) are MLflow's. Returns a :class:`~asynctrack._artifacts.models.LoggedModelHandle`
        (``model_uri``, ``model_id``, ``wait()``).
        """
        from asynctrack._artifacts.models import log_model

        return log_model(
            self._artifact_run(),
            model,
            name or artifact_path,
            input_example=input_example,
            registered_model_name=registered_model_name,
            flavor=flavor,
            **kwargs,
        )


def _capture(
    run: Run, kind: str, label: str, stage: Callable[[Path], list[staging.StagedFile]]
) -> None:
    """Stage into a fresh area (removed again if staging fails) and queue the upload."""
    area = staging.new_area(run.engine)
    try:
        files = stage(area)
    except BaseException:
        staging.remove(area)
        raise
    queue_files(run, kind, label, area, files)


def _write_staged(
    area: Path, dest: str, write: Callable[[Path], object], source: str
) -> staging.StagedFile:
    path = area / dest
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return staging.StagedFile(str(path), dest, source, path.stat().st_size)


def _renderer(figure: Any, name: str, save_kwargs: dict[str, Any]) -> Callable[[Path], object]:
    """How to write ``figure``, checked before anything is staged."""
    if "matplotlib" in sys.modules:
        import matplotlib.figure

        if isinstance(figure, matplotlib.figure.Figure):
            return lambda path: figure.savefig(path, **save_kwargs)
    if "plotly" in sys.modules:
        import plotly.graph_objects  # type: ignore[import-not-found, unused-ignore]

        if isinstance(figure, plotly.graph_objects.Figure):
            extension = os.path.splitext(name)[1]
            if extension == ".html":
                save_kwargs.setdefault("include_plotlyjs", "cdn")
                save_kwargs.setdefault("auto_open", False)
                return lambda path: figure.write_html(path, **save_kwargs)
            if extension in (".png", ".jpeg", ".webp", ".svg", ".pdf"):
                return lambda path: figure.write_image(path, **save_kwargs)
            raise TypeError(f"unsupported file extension for a plotly figure: {extension!r}")
    raise TypeError(f"unsupported figure type: {type(figure).__name__} (matplotlib or plotly)")
