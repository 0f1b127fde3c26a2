"""Configuration: the seed's MLflow/S3 settings and the engine's own knobs.

The MLflow and S3 settings are read from the environment once, at import, with the seed's
development defaults. The engine's knobs are resolved in this order: keyword argument to
:func:`asynctrack.configure` (or :class:`EngineConfig`), then the ``ASYNCTRACK_*``
environment variable, then the ``DEFAULT_*`` constant below. An invalid value raises
:class:`~asynctrack.errors.ConfigError` (a ``ValueError``) when the config is built.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any, Literal

from asynctrack.errors import ConfigError

__all__ = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "DEFAULT_ARTIFACTS_DESTINATION",
    "DEFAULT_EXIT_TIMEOUT",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_FLUSH_TIMEOUT",
    "DEFAULT_FULL_POLICY",
    "DEFAULT_MAX_CONCURRENT_UPLOADS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MULTIPART_PART_SIZE",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_QUEUE_CAPACITY",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_STAGING_DIR",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "EngineConfig",
    "FullPolicy",
    "setup_mlflow_env",
]

MLFLOW_TRACKING_URI: str = os.getenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
MLFLOW_EXPERIMENT_NAME: str = os.getenv("MLFLOW_EXPERIMENT_NAME", "boston-housing")
MLFLOW_S3_ENDPOINT_URL: str = os.getenv("MLFLOW_S3_ENDPOINT_URL", "http://localhost:9000")
AWS_ACCESS_KEY_ID: str = os.getenv("AWS_ACCESS_KEY_ID", "minioadmin0")
AWS_SECRET_ACCESS_KEY: str = os.getenv("AWS_SECRET_ACCESS_KEY", "minioadmin1230")


def setup_mlflow_env() -> None:
    """Export the S3 settings for MLflow's artifact clients and point MLflow at the server.

    Values already present in the environment are kept; the tracking URI becomes
    :data:`MLFLOW_TRACKING_URI`.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", MLFLOW_S3_ENDPOINT_URL)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY)
    mlflow.set_tracking_uri(MLFLOW_TRACKING_URI)


FullPolicy = Literal["block", "drop", "raise"]

#: Events held in memory before the full-queue policy applies (about 150 bytes each).
DEFAULT_QUEUE_CAPACITY = 500_000
#: Seconds between sends of a partial batch.
DEFAULT_FLUSH_INTERVAL = 1.0
#: log_batch calls sent at once: the server ingests about twice as much with 4 in flight.
DEFAULT_MAX_IN_FLIGHT = 4
#: Seconds the interpreter's exit may spend sending what is left.
DEFAULT_EXIT_TIMEOUT = 10.0
#: Deadline for flush(timeout=None), run end, and a caller waiting for room in the queue.
DEFAULT_FLUSH_TIMEOUT = 60.0
#: Seconds one HTTP request may take before it counts as a transient failure.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: What a logging call does when the queue is full: wait for room, drop (counted), or raise.
DEFAULT_FULL_POLICY: FullPolicy = "block"
#: Artifact files at least this large (bytes) go to S3 as multipart uploads.
DEFAULT_MULTIPART_THRESHOLD = 8 * 1024 * 1024
#: Bytes in each part of a multipart upload; S3 wants at least 5 MiB (the last part excepted).
DEFAULT_MULTIPART_PART_SIZE = 8 * 1024 * 1024
#: Send each multipart part's CRC32 (a plain header) so S3 checks it and completes the upload
#: from the parts' checksums; off for S3-compatible servers that refuse checksum headers.
DEFAULT_MULTIPART_CHECKSUMS = True
#: Files or parts uploaded at once; each streams from disk, holding at most 1 MiB in memory.
DEFAULT_MAX_CONCURRENT_UPLOADS = 8
#: Where artifacts are copied at the call until stored ("": beside the spool, in the
#: process's spool directory; the system's temporary directory with the spool off).
DEFAULT_STAGING_DIR = ""
#: A proxied server's ``--artifacts-destination`` (``s3://...``): upload there directly
#: instead of through the server ("": through the server).
DEFAULT_ARTIFACTS_DESTINATION = ""

#: Keep what the worker takes off the queue on local disk until stored (see README, "Spool").
DEFAULT_SPOOL = True
#: The spool's root ("": ``$XDG_STATE_HOME/asynctrack/spool``, else ``~/.local/state/...``).
DEFAULT_SPOOL_DIR = ""
#: Seconds between two fsyncs of the spool: what a crash can lose at most.
DEFAULT_SPOOL_SYNC_INTERVAL = 1.0
#: Bytes one process may keep in its spool; beyond it, callers wait as for a full queue.
DEFAULT_SPOOL_LIMIT = 10 * 1024**3
#: Replay the spools of processes that died, in the background, when an engine starts.
DEFAULT_SPOOL_RECOVER = False

_POLICIES = ("block", "drop", "raise")
_MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
_MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
# Settings compared case-insensitively; paths and URIs keep their case.
_CASE_INSENSITIVE = ("ASYNCTRACK_FULL_POLICY",)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs; ``None`` means "environment variable, then default"."""

    queue_capacity: int = DEFAULT_QUEUE_CAPACITY
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    exit_timeout: float = DEFAULT_EXIT_TIMEOUT
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    full_policy: FullPolicy = DEFAULT_FULL_POLICY
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    multipart_part_size: int = DEFAULT_MULTIPART_PART_SIZE
    multipart_checksums: bool = DEFAULT_MULTIPART_CHECKSUMS
    max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS
    staging_dir: str = DEFAULT_STAGING_DIR
    artifacts_destination: str = DEFAULT_ARTIFACTS_DESTINATION
    spool: bool = DEFAULT_SPOOL
    spool_dir: str = DEFAULT_SPOOL_DIR
    spool_sync_interval: float = DEFAULT_SPOOL_SYNC_INTERVAL
    spool_limit: int = DEFAULT_SPOOL_LIMIT
    spool_recover: bool = DEFAULT_SPOOL_RECOVER

    def __post_init__(self) -> None:
        for name in (
            "queue_capacity",
            "max_in_flight",
            "multipart_threshold",
            "max_concurrent_uploads",
            "spool_limit",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("spool", "spool_recover", "multipart_checksums"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in (
            "flush_interval",
            "exit_timeout",
            "flush_timeout",
            "request_timeout",
            "spool_sync_interval",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
            if math.isnan(value) or value <= 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.full_policy not in _POLICIES:
            raise ConfigError(f"full_policy must be one of {_POLICIES}, got {self.full_policy!r}")
        self._check_artifact_settings()

    def _check_artifact_settings(self) -> None:
        size = self.multipart_part_size
        if type(size) is not int or not _MIN_PART_SIZE <= size <= _MAX_PART_SIZE:
            raise ConfigError(
                f"multipart_part_size must be an integer from {_MIN_PART_SIZE} (5 MiB) to "
                f"{_MAX_PART_SIZE} (5 GiB) bytes, got {size!r}"
            )
        for name in ("staging_dir", "artifacts_destination", "spool_dir"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        destination = self.artifacts_destination
        if destination and not destination.startswith("s3://"):
            raise ConfigError(
                f"artifacts_destination must be an s3:// URI (or empty), got {destination!r}"
            )

    @classmethod
    def resolve(cls, **overrides: Any) -> EngineConfig:
        """Build a config from keyword arguments, then ``ASYNCTRACK_*`` variables, then defaults."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise ConfigError(f"unknown engine setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, field in known.items():
            if overrides.get(name) is not None:
                values[name] = overrides[name]
                continue
            env_name = f"ASYNCTRACK_{name.upper()}"
            raw = os.environ.get(env_name)
            if raw is not None and raw.strip():
                values[name] = _parse(env_name, raw.strip(), field.default)
        return cls(**values)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(env_name: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{env_name} must be one of {', '.join(_TRUE + _FALSE)}, got {raw!r}")
    if isinstance(default, str):
        return raw.lower() if env_name in _CASE_INSENSITIVE else raw
    try:
        return int(raw) if isinstance(default, int) else float(raw)
    except ValueError:
        raise ConfigError(f"{env_name} must be a number, got {raw!r}") from None
