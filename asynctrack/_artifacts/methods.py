"""The trackers' artifact and model methods (a mixin of MLflowExperimentTracker)."""

from __future__ import annotations


class ArtifactMethods:
    """log_artifact, log_artifacts, log_dict, log_figure, log_model: arriving with the
    artifacts work."""
