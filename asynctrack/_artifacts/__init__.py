"""Artifacts and models: captured at the call, uploaded by the engine's worker.

- ``methods``: the trackers' ``log_artifact``/``log_artifacts``/``log_dict``/``log_text``/
  ``log_figure``/``log_model`` (a mixin of ``MLflowExperimentTracker``);
- ``paths``: checks of run-relative paths, and where an artifact URI's files go;
- ``staging``: the per-process copies that keep what a call logged;
- ``upload``: a call's files as one engine job, to S3 or through MLflow's repositories;
- ``s3``: the aiobotocore uploader (streamed bodies, concurrent multipart, retries);
- ``models``: ``log_model`` as an MLflow 3 logged model, and the handle it returns.

``@log_artifact_decorator`` lives in ``asynctrack.decorators`` with the other decorators.
"""
