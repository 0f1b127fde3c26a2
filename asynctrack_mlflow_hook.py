"""asynctrack's environment switch: ``ASYNCTRACK_PATCH_MLFLOW=1`` patches MLflow in every
Python process of the environment that imports it (what ``asynctrack run`` sets).

How it takes effect: asynctrack registers this module under MLflow's
``mlflow.run_context_provider`` entry-point group, which MLflow loads while ``import mlflow``
runs. With the switch on, it waits for ``mlflow.tracking.fluent`` to finish loading and
puts trampolines in place of the functions and ``MlflowClient`` methods the patch
replaces; the first call to any of them installs :func:`asynctrack.patch_mlflow` (by then
MLflow is fully imported) and goes on to the patched function. A process that never
imports MLflow pays nothing, and nothing is imported from asynctrack before that first
call: asynctrack itself imports MLflow, which is mid-import here.

A top-level module, not part of the ``asynctrack`` package: importing that package here
would import MLflow modules that are still loading.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from mlflow.tracking.context.abstract_context import RunContextProvider

ENV_SWITCH = "ASYNCTRACK_PATCH_MLFLOW"

#: The same names as asynctrack._mlflow.fluent.NAMES and asynctrack._gate.PATCHED_CLIENT_METHODS
#: (a test checks).
FLUENT_NAMES = (
    "log_metric", "log_metrics", "log_param", "log_params", "set_tag", "set_tags",
    "delete_tag", "end_run", "flush_async_logging",
)  # fmt: skip
CLIENT_NAMES = (
    "log_metric", "log_batch", "log_param", "set_tag", "delete_tag", "set_terminated",
    "log_artifact", "log_artifacts", "log_text", "log_dict", "log_figure", "get_run",
    "get_metric_history", "search_runs", "list_artifacts", "download_artifacts",
)  # fmt: skip

_FLUENT = "mlflow.tracking.fluent"
_lock = threading.RLock()
_activated = False


def switched_on() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


class AsyncTrackContext(RunContextProvider):
    """The entry point MLflow loads; as a run context provider it adds no tags."""

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict[str, str]:
        return {}


def _activate() -> None:
    """Install the real patch (first call of a trampoline)."""
    global _activated
    with _lock:
        if _activated:
            return
        _activated = True
        try:
            from asynctrack._mlflow.patch import patch_mlflow

            patch_mlflow()
        except Exception as exc:  # never break the caller's MLflow: fall back to it
            _restore()
            sys.stderr.write(f"asynctrack: could not patch MLflow ({exc!r}); MLflow unpatched\n")


def _trampoline(owner: Any, name: str, original: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        _activate()
        target = getattr(owner, name)
        if target is call:  # the patch did not take this name
            return original(*args, **kwargs)
        return target(*args, **kwargs)

    call.__name__ = getattr(original, "__name__", name)
    call.__qualname__ = getattr(original, "__qualname__", name)
    call.__doc__ = original.__doc__
    call.__asynctrack_original__ = original  # type: ignore[attr-defined]
    return call


def _install_trampolines(fluent: ModuleType) -> None:
    from mlflow.tracking.client import MlflowClient

    for owner, names in ((fluent, FLUENT_NAMES), (MlflowClient, CLIENT_NAMES)):
        for name in names:
            original = owner.__dict__.get(name)
            if original is not None:
                setattr(owner, name, _trampoline(owner, name, original))


def _restore() -> None:
    fluent = sys.modules.get(_FLUENT)
    mlflow = sys.modules.get("mlflow")
    client = sys.modules.get("mlflow.tracking.client")
    owners = [m for m in (fluent, mlflow) if m is not None]
    if client is not None:
        owners.append(client.MlflowClient)
    for owner in owners:
        for name, value in list(vars(owner).items()):
            original = getattr(value, "__asynctrack_original__", None)
            if original is not None:
                setattr(owner, name, original)


class _AfterFluent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets ``mlflow.tracking.fluent`` load as usual, then puts the trampolines in."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _FLUENT:
            return None
        sys.meta_path.remove(self)  # once; and the real finders find the real spec
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _install_trampolines(module)


def _arm() -> None:
    if not switched_on():
        return
    fluent = sys.modules.get(_FLUENT)
    if fluent is not None and hasattr(fluent, "end_run"):
        _install_trampolines(fluent)  # MLflow already imported (the group loaded late)
    elif not any(isinstance(f, _AfterFluent) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterFluent())


_arm()
