"""``patch_mlflow()`` / ``unpatch_mlflow()``: MLflow's own logging API, through the engine.

The fluent functions are replaced in ``mlflow`` and in ``mlflow.tracking.fluent`` (whose
own code, ``ActiveRun.__exit__`` say, looks ``end_run`` up there); the client's methods
on the ``MlflowClient`` class, so clients made before the patch use it too. One lock
makes patching and unpatching safe from any thread; both are idempotent.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import Any

__all__ = ["MlflowPatch", "is_patched", "patch_mlflow", "unpatch_mlflow"]

_lock = threading.Lock()
_saved: list[tuple[Any, str, Any]] = []  # (owner, name, what was there): for unpatch
_told = False
_NOTICED = "ASYNCTRACK_PATCH_MLFLOW_NOTICE_SHOWN"

NOTICE = (
    "asynctrack: MLflow logging goes through asynctrack's engine (queued, sent in the "
    "background). What the server refuses is raised by mlflow.end_run(), "
    "mlflow.flush_async_logging() or asynctrack.flush(), and reported on stderr at exit.\n"
)


class MlflowPatch:
    """What :func:`patch_mlflow` returns; as a context manager, the patch lasts for the
    block (unless it was already in place before)."""

    def __init__(self, installed: bool) -> None:
        self._installed = installed

    def __enter__(self) -> MlflowPatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            unpatch_mlflow()

    def __repr__(self) -> str:
        return f"MlflowPatch(active={is_patched()})"


def is_patched() -> bool:
    return bool(_saved)


def patch_mlflow(*, quiet: bool = False) -> MlflowPatch:
    """Send MLflow's logging calls (``mlflow.log_metric``..., ``MlflowClient.log_batch``...)
    through asynctrack's engine. Idempotent and thread-safe; says so on stderr once per
    process unless ``quiet``."""
    global _told
    import mlflow
    import mlflow.tracking.fluent as fluent_module
    from mlflow.tracking.client import MlflowClient

    from asynctrack import _gate  # takes MLflow's own client methods: before any swap
    from asynctrack._mlflow import client, fluent, private, sink

    with _lock:
        if _saved:
            return MlflowPatch(installed=False)
        private.watch_active_models()
        for name in fluent.NAMES:
            replacement = getattr(fluent, name)
            for owner in (mlflow, fluent_module):
                _swap(owner, name, replacement)
        _rebind_imported_copies(fluent.ORIGINALS, fluent)
        for name in _gate.PATCHED_CLIENT_METHODS:
            _swap(MlflowClient, name, getattr(client, name))
        sink.at_exit(_end_active_run)
        # Once per process tree: children started later (the launcher's workers) stay quiet.
        if not _told and not quiet and not os.environ.get(_NOTICED):
            _told = True
            os.environ[_NOTICED] = "1"
            sys.stderr.write(NOTICE)
    return MlflowPatch(installed=True)


def unpatch_mlflow() -> None:
    """Give MLflow its own functions back. What was queued is still sent."""
    from asynctrack._mlflow import private, routing

    with _lock:
        if _saved:
            private.unwatch_active_models()
        while _saved:
            owner, name, original = _saved.pop()
            setattr(owner, name, original)
        routing.forget()


def _swap(owner: Any, name: str, replacement: Any) -> None:
    from asynctrack._mlflow import routing

    if name not in owner.__dict__:
        return  # not exported there by this MLflow version
    _saved.append((owner, name, routing.real(owner.__dict__[name])))
    setattr(owner, name, replacement)


def _rebind_imported_copies(originals: dict[str, Any], replacements: Any) -> None:
    """Modules that did ``from mlflow import log_metrics`` before the patch (MLflow's own
    ``mlflow.keras.callback``, or a user's script) hold MLflow's function: point those
    names at the replacement too (and back at unpatch)."""
    from asynctrack._mlflow import routing

    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, original in originals.items():
            value = namespace.get(name)
            if value is not None and routing.real(value) is original:
                _swap(module, name, getattr(replacements, name))


def _end_active_run() -> None:
    """At exit, before the engines close: end the active run as MLflow's own exit hook
    would (it runs after ours and would find the engine closed)."""
    if not _saved:
        return
    import contextlib

    import mlflow

    from asynctrack._mlflow import fluent

    with contextlib.suppress(Exception):
        if mlflow.active_run() is not None:
            fluent.end_run()
