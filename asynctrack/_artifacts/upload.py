"""Storing staged files under an artifact URI: the work of an artifact job.

``s3://`` roots (and ``mlflow-artifacts:`` ones when the server's destination is
configured) go straight to S3 through :class:`~asynctrack._artifacts.s3.S3Uploader`; any
other root (``mlflow-artifacts:`` through the server, ``file:``, local paths, other clouds)
through MLflow's own artifact repository, one blocking call per file on the engine's I/O
threads. MLflow's HTTP client already retries connection errors and 5xx responses with
backoff, so its failures are final here.

Every file is tried; each one's staged copy is removed as soon as it is stored or failed,
so disk use shrinks as the job goes. The job fails with one message naming every file not
stored and why, and that message becomes the run's rejection at the next flush.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from asynctrack._artifacts import staging
from asynctrack._artifacts.paths import direct_s3_uri
from asynctrack._artifacts.s3 import S3Uploader, UploadFailed
from asynctrack._artifacts.staging import StagedFile
from asynctrack._engine.events import Job
from asynctrack._engine.jobs import JobContext
from asynctrack._engine.stats import FileCounters
from asynctrack._engine.transport import redact

if TYPE_CHECKING:
    from asynctrack._runs import Run

Send = Callable[[StagedFile, asyncio.Semaphore], Awaitable[None]]

_SHOWN = 10  # failed files named in one message


class ArtifactsNotStored(Exception):
    """Some files of one call could not be stored; the message names them."""


def queue_files(run: Run, kind: str, label: str, area: Path, files: list[StagedFile]) -> None:
    """Hand staged files to the run's engine; they are stored under the run's artifact URI."""
    engine = run.engine
    if not files:
        staging.remove(area)
        return

    async def work(jobs: JobContext) -> None:
        try:
            await store(jobs, run.artifact_uri, run.tracking_uri, files)
        finally:
            await jobs.run_blocking(partial(staging.remove, area))

    counters = engine.files
    counters.queued(len(files), sum(f.size for f in files))
    try:
        # The spool keeps the area: laid out as run-relative paths, it is all that
        # `asynctrack sync` needs to upload what a crash left behind.
        engine.put(Job(run.run_id, kind, label, work, spooled=(str(area), None)))
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


async def store(
    jobs: JobContext, artifact_uri: str, tracking_uri: str, files: Sequence[StagedFile]
) -> None:
    """Upload ``files`` under ``artifact_uri``; raise ArtifactsNotStored naming failures."""
    clean_at_stop(jobs)
    counters = jobs.files
    try:
        send = _sender(jobs, artifact_uri, tracking_uri, counters)
    except Exception as exc:  # no way to store there (an unknown scheme, say): all fail
        for staged in files:
            counters.failed(staged.size)
        raise ArtifactsNotStored(
            redact(f"no file stored under {artifact_uri}: {type(exc).__name__}: {exc}")
        ) from None
    slots = _slots(jobs)
    results = await asyncio.gather(
        *(_store_one(send, slots, counters, f) for f in files), return_exceptions=True
    )
    failures = [(f, r) for f, r in zip(files, results, strict=True) if isinstance(r, BaseException)]
    for _, result in failures:
        if isinstance(result, asyncio.CancelledError):
            raise result
    if failures:
        raise ArtifactsNotStored(_message(len(files), failures))


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
            try:
                await jobs.run_blocking(partial(repo.log_artifact, staged.path, directory))
            except Exception as exc:
                raise UploadFailed(redact(f"{type(exc).__name__}: {exc}")) from None

    return through_mlflow


def _slots(jobs: JobContext) -> asyncio.Semaphore:
    """The engine's upload slots, shared by all its jobs (created on the worker loop)."""
    if jobs.resources.upload_slots is None:
        jobs.resources.upload_slots = asyncio.Semaphore(jobs.config.max_concurrent_uploads)
    return jobs.resources.upload_slots


async def _store_one(
    send: Send, slots: asyncio.Semaphore, counters: FileCounters, staged: StagedFile
) -> None:
    try:
        await send(staged, slots)
    except Exception:
        counters.failed(staged.size)
        raise
    else:
        counters.uploaded(staged.size)
    finally:
        _unlink(staged.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        return  # already gone: the area is removed at the end anyway


def _message(total: int, failures: list[tuple[StagedFile, BaseException]]) -> str:
    lines = [f"{f.source} -> {f.dest}: {error}" for f, error in failures[:_SHOWN]]
    more = len(failures) - _SHOWN
    head = "not stored" if total == 1 else f"{len(failures)} of {total} files not stored"
    tail = f"; and {more} more" if more > 0 else ""
    return f"{head}: " + "; ".join(lines) + tail
