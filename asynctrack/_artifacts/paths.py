"""Artifact paths: checked at the call, and where a run-relative path lands.

Paths are normalised as MLflow normalises an ``artifact_file`` (``dir/../f.txt`` is
``f.txt``). A path that still leaves the run's root (``../f.txt``), or an absolute one,
would put files beside or outside the run (S3 keys do not normalise ``..`` away, and a
local store would write outside its folder): it is refused at the call.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse

from asynctrack.errors import InvalidInputError

# The characters MLflow refuses in a logged model's name (mlflow/utils/validation.py).
_MODEL_NAME_BAD_CHARS = ("/", ":", ".", "%", '"', "'")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def check_artifact_dir(artifact_path: str | None) -> str:
    """A run-relative directory in posix form ("" for the run's root); InvalidInputError
    (a ValueError) if it leaves the root."""
    if artifact_path is None:
        return ""
    if not isinstance(artifact_path, str):
        raise TypeError(f"artifact_path must be a string, got {type(artifact_path).__name__}")
    path = artifact_path.replace("\\", "/")
    if path.startswith("/") or _WINDOWS_DRIVE.match(path):
        raise InvalidInputError(
            f"artifact_path {artifact_path!r} is absolute; it must be relative to the run's "
            "artifact root"
        )
    path = posixpath.normpath(path) if path else ""
    if path == ".." or path.startswith("../"):
        raise InvalidInputError(
            f"Invalid artifact path: {path!r}. Names may be treated as files in certain cases, "
            "and must not resolve to other names when treated as such (artifact_path "
            f"{artifact_path!r} leaves the run's artifact root)"
        )
    return "" if path == "." else path


def check_artifact_file(artifact_file: str) -> tuple[str, str]:
    """Split a run-relative file path into (directory, file name); ValueError if it leaves
    the run's root or names no file."""
    if not isinstance(artifact_file, str):
        raise TypeError(f"artifact_file must be a string, got {type(artifact_file).__name__}")
    path = artifact_file.replace("\\", "/")
    directory, name = posixpath.split(posixpath.normpath(path) if path else path)
    if name in ("", ".", ".."):
        raise ValueError(f"artifact_file {artifact_file!r} names no file")
    try:
        return check_artifact_dir(directory), name
    except InvalidInputError as exc:
        raise InvalidInputError(
            str(exc).replace(f"artifact_path {directory!r}", f"artifact_file {artifact_file!r}")
        ) from None


def check_model_name(name: str) -> str:
    """A logged model's name, refused at the call as the server would refuse it later."""
    if not isinstance(name, str) or not name or any(c in name for c in _MODEL_NAME_BAD_CHARS):
        raise ValueError(
            f"invalid model name {name!r}: it must be a non-empty string without any of "
            f"{' '.join(_MODEL_NAME_BAD_CHARS)} (it becomes runs:/<run_id>/<name>)"
        )
    return name


def join(*parts: str) -> str:
    """Join run-relative path parts, skipping empty ones."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix"), as MLflow's S3 store does."""
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/").rstrip("/")


def direct_s3_uri(artifact_uri: str, artifacts_destination: str) -> str | None:
    """The ``s3://`` location files under ``artifact_uri`` go to, or None when they must go
    through MLflow's own artifact repository.

    ``mlflow-artifacts:`` URIs map onto the server's ``--artifacts-destination`` when the
    user told us what it is (the server does not say): the server stores
    ``mlflow-artifacts:/<path>`` at ``<destination>/<path>``.
    """
    if artifact_uri.startswith("s3://"):
        return artifact_uri
    if artifacts_destination and artifact_uri.startswith("mlflow-artifacts:"):
        path = urllib.parse.urlparse(artifact_uri).path.lstrip("/")
        return f"{artifacts_destination.rstrip('/')}/{path}"
    return None
