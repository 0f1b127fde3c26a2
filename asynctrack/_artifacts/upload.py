"""Storing staged files under an artifact URI: the work of an artifact job.

``s3://`` roots (and ``mlflow-artifacts:`` ones when the server's destination is
configured) go straight to S3 through :class:`~asynctrack._artifacts.s3.S3Uploader`; any
other root (``mlflow-artifacts:`` through the server, ``file:``, local paths, other clouds)
through MLflow's own artifact repository, one blocking call per file on the engine's I/O
threads. ``asynctrack sync`` uploads what a process left staged the same way.

Each file's fate follows its server's answer, sorted in one place per kind of server
(:func:`asynctrack._artifacts.s3.sort_error` for S3,
:func:`asynctrack._engine.transport.sort_mlflow_error` for the tracking server and MLflow's
repositories):

- stored: the file is done;
- transient (the server or S3 away, a timeout, a 5xx, MLflow's own retries exhausted):
  tried again with the job context's retry policy, as long as the process lives (the exit
  deadline cuts it short) or, in ``sync``, until its ``--timeout``;
- held (credentials or a permission refused): the job raises
  :class:`~asynctrack._engine.transport.Held`; the dispatcher keeps it and runs it again
  later, for the files not stored yet, with credentials resolved anew;
- refused (any other answer: the data itself, a bucket that does not exist): final, and
  reported at the next flush naming the file and the reason.

The staged copies stay until the whole job is done (every file stored or refused): then
the spool marks the upload done and removes them (``Intake.note_done``). A job cut short
keeps them, and its spool record, for ``asynctrack sync``.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from asynctrack._artifacts import staging
from asynctrack._artifacts.paths import direct_s3_uri, join
from asynctrack._artifacts.s3 import S3Uploader, UploadFailed
from asynctrack._artifacts.staging import StagedFile
from asynctrack._engine.events import Job
from asynctrack._engine.jobs import JobContext
from asynctrack._engine.retry import GaveUp
from asynctrack._engine.stats import FileCounters
from asynctrack._engine.transport import Held, Refused, Transient, redact, sort_mlflow_error

if TYPE_CHECKING:
    from asynctrack._engine.spool import Artifact

T = TypeVar("T")
Send = Callable[[StagedFile, asyncio.Semaphore], Awaitable[None]]

_SHOWN = 10  # failed files named in one message


class Sink(Protocol):
    """Where a call hands its job: the run's engine."""

    @property
    def files(self) -> FileCounters: ...

    def put(self, event: Job) -> None: ...


class Target(Protocol):
    """The run a call's files belong to (an asynctrack ``Run``: its id, where its artifacts
    go, and its engine), so this package needs nothing of the run layer."""

    @property
    def run_id(self) -> str: ...

    @property
    def artifact_uri(self) -> str: ...

    @property
    def tracking_uri(self) -> str: ...

    @property
    def engine(self) -> Sink: ...


class ArtifactsNotStored(Exception):
    """Some files of one call were refused; the message names them."""


@dataclass
class Upload:
    """One call's staged files as its job goes: those not stored yet, and those refused
    (a job held back runs again later, for the rest only)."""

    files: list[StagedFile]
    total: int = 0
    refused: list[tuple[StagedFile, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.total = self.total or len(self.files)


def queue_files(run: Target, kind: str, label: str, area: Path, files: list[StagedFile]) -> None:
    """Hand staged files to the run's engine; they are stored under the run's artifact URI."""
    engine = run.engine
    if not files:
        staging.remove(area)
        return
    upload = Upload(files)

    async def work(jobs: JobContext) -> None:
        await store(jobs, run.artifact_uri, run.tracking_uri, upload)

    counters = engine.files
    counters.queued(len(files), sum(f.size for f in files))
    # The spool keeps the area, laid out as run-relative paths, and the files it must hold:
    # all that `asynctrack sync` needs to upload them, or to name those that are gone.
    record = {"label": label, "files": [[f.dest, f.size] for f in files]}
    try:
        engine.put(Job(run.run_id, kind, label, work, spooled=(str(area), record)))
    except BaseException:
        counters.queued(-len(files), -sum(f.size for f in files))
        staging.remove(area)
        raise


def clean_at_stop(jobs: JobContext) -> None:
    """Remove the engine's staged leftovers when its worker stops (exit deadline passed),
    unless the spool still names them for ``asynctrack sync``."""
    if not jobs.resources.staging_cleanup:
        jobs.resources.staging_cleanup = True

        def release() -> None:
            if not jobs.spooled():
                staging.release(jobs)

        jobs.resources.exit_stack.callback(release)


async def store(jobs: JobContext, artifact_uri: str, tracking_uri: str, upload: Upload) -> None:
    """Upload the files of ``upload`` not stored yet under ``artifact_uri``; raise
    ArtifactsNotStored naming those refused, Held if some were held back, GaveUp or
    CancelledError if cut short (the files not stored stay in ``upload``)."""
    clean_at_stop(jobs)
    counters = jobs.files
    files = upload.files
    try:
        send = _sender(jobs, artifact_uri, tracking_uri, counters)
    except Exception as exc:  # no way to store there (an unknown scheme, say): all refused
        reason = redact(f"no file stored under {artifact_uri}: {type(exc).__name__}: {exc}")
        for staged in files:
            counters.failed(staged.size)
        upload.files = []
        raise ArtifactsNotStored(reason) from None
    slots = _slots(jobs)
    results = await asyncio.gather(*(send(f, slots) for f in files), return_exceptions=True)
    held, stop = [], None
    upload.files = []
    for staged, result in zip(files, results, strict=True):
        if result is None:
            counters.uploaded(staged.size)
        elif isinstance(result, (Held, GaveUp, asyncio.CancelledError)):
            upload.files.append(staged)  # not stored: kept for the job's next run
            if isinstance(result, Held):
                held.append(f"{staged.dest}: {result.reason}")
            else:
                stop = stop or result
        elif isinstance(result, Exception):
            counters.failed(staged.size)
            upload.refused.append((staged, str(result) or repr(result)))
        else:
            raise result  # KeyboardInterrupt and the like
    if stop is not None:
        raise stop
    if held:
        more = f" (and {len(held) - 1} more files)" if len(held) > 1 else ""
        raise Held(held[0] + more)
    if upload.refused:
        raise ArtifactsNotStored(_message(upload.total, upload.refused))


async def mlflow_call(jobs: JobContext, fn: Callable[[], T], size: int = 0) -> T:
    """``fn`` (a blocking call through MLflow's client or an artifact repository) on an
    I/O thread, its failures sorted by ``sort_mlflow_error``: retried while transient,
    Held raised as it is, a refusal raised as UploadFailed. ``size``: the bytes a retry
    sends again, for the counters."""

    async def call() -> T:
        try:
            return await jobs.run_blocking(fn)
        except Exception as exc:
            raise sort_mlflow_error(exc) from None

    def retrying(exc: Transient) -> None:
        jobs.note_transient(str(exc))
        if size:
            jobs.files.retried(size)

    result = await jobs.retry.attempt(call, retrying)
    if isinstance(result, Held):
        raise result
    if isinstance(result, Refused):
        raise UploadFailed(result.reason)
    return result


def _sender(jobs: JobContext, artifact_uri: str, tracking_uri: str, counters: FileCounters) -> Send:
    s3_uri = direct_s3_uri(artifact_uri, jobs.config.artifacts_destination)
    if s3_uri is not None:
        return S3Uploader(jobs, s3_uri, counters)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)

    async def through_mlflow(staged: StagedFile, slots: asyncio.Semaphore) -> None:
        # The repository names the stored file after the local one: the staged copy is
        # <area>/<dest>, so its name is the destination's.
        directory = posixpath.dirname(staged.dest) or None
        async with slots:
            await mlflow_call(jobs, partial(repo.log_artifact, staged.path, directory), staged.size)

    return through_mlflow


def _slots(jobs: JobContext) -> asyncio.Semaphore:
    """The engine's upload slots, shared by all its jobs (created on the worker loop)."""
    if jobs.resources.upload_slots is None:
        jobs.resources.upload_slots = asyncio.Semaphore(jobs.config.max_concurrent_uploads)
    return jobs.resources.upload_slots


def _message(total: int, failures: Sequence[tuple[StagedFile, str]]) -> str:
    lines = [f"{f.source} -> {f.dest}: {error}" for f, error in failures[:_SHOWN]]
    more = len(failures) - _SHOWN
    head = "not stored" if total == 1 else f"{len(failures)} of {total} files not stored"
    tail = f"; and {more} more" if more > 0 else ""
    return f"{head}: " + "; ".join(lines) + tail


# ------------------------------------------------------------------------- asynctrack sync


def replayed(record: Artifact) -> tuple[Job | None, list[str]]:
    """The upload a dead process left staged (its spool record), for ``sync``: a job for
    the staged files still there, and the run-relative paths of those that are gone (a
    file missing, or not the size it was staged with)."""
    run_id, area = record.run_id, Path(record.path)
    if record.files is not None:
        files, lost = [], []
        for dest, size in record.files:
            path = area / dest
            if path.is_file() and path.stat().st_size == size:
                files.append(StagedFile(str(path), dest, str(path), size))
            else:
                lost.append(dest)
        label = record.label or (files[0].dest if files else "")
    else:  # an older spool: a staged file and its directory, or an area
        files = _older(area, record.artifact_path)
        label = record.path
        lost = [] if files else [join(record.artifact_path or "", area.name)]
    if not files:
        return None, lost
    upload = Upload(files)

    async def work(jobs: JobContext) -> None:
        uri = await mlflow_call(jobs, partial(_artifact_uri, jobs.tracking_uri, run_id))
        await store(jobs, uri, jobs.tracking_uri, upload)

    return Job(run_id, "artifact", label, work, spooled=(record.path, None)), lost


def _older(path: Path, artifact_path: str | None) -> list[StagedFile]:
    if path.is_file():
        dest = join(artifact_path or "", path.name)
        return [StagedFile(str(path), dest, str(path), path.stat().st_size)]
    if not path.is_dir():
        return []
    return [
        StagedFile(f.path, join(artifact_path or "", f.dest), f.source, f.size)
        for f in staging.staged_tree(path)
    ]


def _artifact_uri(tracking_uri: str, run_id: str) -> str:
    from asynctrack._gate import plain_client

    client: Any = plain_client(tracking_uri)
    return str(client.get_run(run_id).info.artifact_uri)
