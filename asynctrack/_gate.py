"""MLflow's internals, behind one gate.

Everything asynctrack needs of MLflow beyond its public API, and every behaviour that
differs between MLflow versions, is reached through this module; the rest of the package
asks here. Each entry says what it is for and what happens where it is missing.
``tests/test_gate.py`` checks every entry against the installed MLflow, so a release that
moves one fails that test, not a user's training run.
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking.client import MlflowClient

# ---------------------------------------------------------------------- the plain client

#: The ``MlflowClient`` methods the drop-in replaces (with ``asynctrack._mlflow.client``
#: functions of the same names; ``asynctrack_mlflow_hook.CLIENT_NAMES`` is checked against it).
PATCHED_CLIENT_METHODS = (
    "log_metric", "log_batch", "log_param", "set_tag", "delete_tag", "set_terminated",
    "log_artifact", "log_artifacts", "log_text", "log_dict", "log_figure", "get_run",
    "get_metric_history", "search_runs", "list_artifacts", "download_artifacts",
)  # fmt: skip


def _mlflow_own(function: Any) -> Any:
    """MLflow's function behind the environment switch's trampoline, or the function."""
    return getattr(function, "__asynctrack_original__", function)


class PlainClient(MlflowClient):
    """``MlflowClient`` with MLflow's own methods, whatever the drop-in does to the class.

    The engine's own calls to MLflow (a local store's batches, run ends and reads, model
    jobs, ``asynctrack sync``'s uploads) use this class: the patch replaces methods on
    ``MlflowClient`` itself, and a subclass's own attributes shadow those, so a call from
    the engine's threads can never come back into the engine and wait on itself.
    The methods are taken when this module is first imported, which
    :func:`asynctrack.patch_mlflow` makes sure happens before it patches.
    """


for _name in PATCHED_CLIENT_METHODS:
    _method = MlflowClient.__dict__.get(_name)
    if _method is not None:
        if getattr(_method, "__module__", "").startswith("asynctrack."):
            raise ImportError(f"asynctrack._gate imported after MLflow was patched ({_name})")
        setattr(PlainClient, _name, _mlflow_own(_method))
del _name, _method


def plain_client(tracking_uri: str) -> Any:
    """An unpatched client of ``tracking_uri`` (see :class:`PlainClient`)."""
    return PlainClient(tracking_uri=tracking_uri)
