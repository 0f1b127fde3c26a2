"""MLflow's own API through asynctrack's engine: the patch, the launcher, the env switch.

Private; the public names are :func:`asynctrack.patch_mlflow` and
:func:`asynctrack.unpatch_mlflow`, and the ``asynctrack run`` command.
"""

from asynctrack._mlflow.patch import MlflowPatch, is_patched, patch_mlflow, unpatch_mlflow

__all__ = ["MlflowPatch", "is_patched", "patch_mlflow", "unpatch_mlflow"]
