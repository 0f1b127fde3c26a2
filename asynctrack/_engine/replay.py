"""Replaying what dead processes left in the spool: ``asynctrack sync``.

A dead writer's directory is read back as a :class:`SegmentSource` and fed to the same
:class:`~asynctrack._engine.dispatcher.Dispatcher` the live worker uses (as neptune's sync
reuses its queue), so batching, retries, splitting a refused request, params and tags in
order and a run's end after its events follow the same rules. Records the writer marked
settled (the server stored or refused all their events) are skipped, and finished uploads
too. A segment is deleted once each of its events is stored or refused; a sync cut short
marks what it settled the same way, so the next one sends only the rest (and what was in
flight: harmless, the server ignores a metric stored twice, a param re-logged with its
value, and an end goes only to a run the server still shows RUNNING).

Replay holds the directory's lock while it works, so neither a live writer nor a second
sync is raced. Each directory has a deadline of its own: a server that does not answer
leaves its directories for the next sync, and every other directory is still recovered.
Directories sent to a tracking server are replayed several at once (the 16 ranks of a job
that crashed), each on a thread of its own; their requests to one server share the
process's limiter for it (``limiter_for``), as the engines of one process do. Directories
sent to a local store (sqlite takes one writer at a time) go one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from asynctrack._engine import spool
from asynctrack._engine.dispatcher import Dispatcher
from asynctrack._engine.events import Job, MetaEvent, to_seconds
from asynctrack._engine.jobs import Resources
from asynctrack._engine.kept import Kept
from asynctrack._engine.ledger import Ledger
from asynctrack._engine.limiter import limiter_for
from asynctrack._engine.retry import GaveUp, RetryPolicy
from asynctrack._engine.stats import FileCounters
from asynctrack._engine.status import DirStatus, Survey, status, survey, writer_dirs
from asynctrack._engine.threads import DaemonPool, run_each
from asynctrack._engine.transport import (
    Held,
    Refused,
    Transient,
    Transport,
    make_transport,
    redact,
    sort_mlflow_error,
)
from asynctrack.config import EngineConfig
from asynctrack.errors import KeptEvents, Rejection

__all__ = ["DirStatus", "SyncReport", "discard", "replay", "status"]

T = TypeVar("T")
_REQUEST_TIMEOUT = 30.0
_STATUSES = ("FINISHED", "FAILED", "KILLED")
_AT_ONCE = 8  # directories replayed at once


@dataclass
class SyncReport:
    """What one replay did; ``ok`` when every event found was stored."""

    stored: int = 0
    refused: list[Rejection] = field(default_factory=list)
    #: held back for credentials or a permission: on disk still, for a later sync
    kept: list[KeptEvents] = field(default_factory=list)
    left: int = 0  # events still on disk: the deadline passed, or a directory was not sent
    damaged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # directories in use
    ended_runs: list[str] = field(default_factory=list)  # no end spooled: ended with `status`
    open_runs: list[str] = field(default_factory=list)  # no end spooled, left RUNNING
    errors: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)  # one summary line each

    @property
    def ok(self) -> bool:
        return not (self.refused or self.kept or self.left or self.damaged or self.errors)

    def add(self, other: SyncReport) -> None:
        self.stored += other.stored
        self.left += other.left
        names = ("refused", "kept", "damaged", "skipped", "ended_runs", "open_runs", "errors")
        for name in names:
            getattr(self, name).extend(getattr(other, name))
        self.directories.extend(other.directories)


def replay(
    root: Path,
    *,
    status: str | None = "FAILED",
    tracking_uri: str | None = None,
    timeout: float = 300.0,
    progress: Callable[[int], None] | None = None,
) -> SyncReport:
    """Send what dead writers left under ``root`` (the spool root or one writer directory).

    Runs with no end spooled are ended with ``status`` if the server still shows them
    RUNNING (``None``: left as they are). Each directory goes to its own tracking URI unless
    ``tracking_uri`` is given. While a server is away, requests are retried with backoff
    until ``timeout`` seconds pass without an answer; what is left stays on disk.
    ``progress(n)`` is called with each number of events stored or refused.
    """
    if status is not None and status not in _STATUSES:
        raise ValueError(f"status must be one of {', '.join(_STATUSES)} or None, got {status!r}")
    report = SyncReport()
    found = writer_dirs(root)
    not_orphans: set[str] = set()  # runs a live process logs to, or another directory ends
    surveys: dict[Path, Survey] = {}
    for d in found:
        seen = survey(d.segments, writing=d.alive)
        not_orphans |= seen.runs if d.alive else seen.ended
        if not d.alive:  # a dead writer's segments only ever go away: reused if all there
            surveys[d.directory] = seen
    silent: set[str] = set()  # servers that did not answer in this sync: not waited for again
    if progress is not None:  # called from each directory's thread
        progress = partial(_locked, threading.Lock(), progress)
    dirs = [_Directory(d, SyncReport(), status, tracking_uri, timeout, progress) for d in found]
    calls = {
        one: partial(one.replay, surveys.get(one.found.directory), not_orphans, silent)
        for one in dirs
    }
    for one in dirs:
        if not one.served:
            calls[one]()
    run_each([calls[one] for one in dirs if one.served], _AT_ONCE, "asynctrack-sync")
    for one in dirs:
        report.add(one.report)
    return report


def discard(root: Path) -> list[DirStatus]:
    """The user's explicit command to drop what dead writers left under ``root``: each
    directory not in use is deleted with the staged files it names; returns what was
    dropped (a directory in use is left alone and not returned)."""
    dropped = []
    for found in status(root):
        if found.alive:
            continue
        with spool.claim(found.directory) as fd:
            if fd is None:
                continue
            for segment in found.directory.glob("*.seg"):
                with contextlib.suppress(OSError):
                    for _, events in spool.read_segment(segment).records:
                        for event in events:
                            if isinstance(event, (spool.Artifact, spool.Model)):
                                _remove_staged(Path(event.path))
            shutil.rmtree(found.directory, ignore_errors=True)
        dropped.append(found)
    return dropped


def _locked(lock: threading.Lock, progress: Callable[[int], None], count: int) -> None:
    with lock:
        progress(count)


class _Directory:
    """One dead writer's directory, replayed under its lock."""

    def __init__(
        self,
        found: spool.SpoolDir,
        report: SyncReport,
        end_status: str | None,
        override: str | None,
        timeout: float,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.found, self.report, self.end_status = found, report, end_status
        self.override, self.timeout = override, timeout
        self.ledger = Ledger(on_settled=progress)
        self.kept = Kept()
        self.policy = RetryPolicy(first=0.25, maximum=15.0, patience=timeout)
        self.request_timeout = min(_REQUEST_TIMEOUT, max(timeout, 1.0))
        self.last_error = ""
        uri = override or found.owner.get("tracking_uri")
        #: sent to a server (replayed alongside others), not to a local store
        self.served = isinstance(uri, str) and uri.startswith(("http://", "https://"))

    def replay(self, seen: Survey | None, not_orphans: set[str], silent: set[str]) -> None:
        where = self.found.directory
        with spool.claim(where) as fd:
            if fd is None:
                owner = self.found.owner
                self.report.skipped.append(
                    f"{where}: in use by pid {owner.get('pid')} on host {owner.get('host')} "
                    "(still writing, or another sync is replaying it)"
                )
                return
            segments = sorted(where.glob("*.seg"))
            if not (where / "lock").exists():
                return  # another sync finished it between our scan and our claim
            if not segments:  # nothing to send: e.g. a writer that failed as it started
                _remove_dir(where)
                return
            if seen is None or seen.paths != segments:  # another sync took some meanwhile
                seen = survey(segments)
            uri = self._uri()
            if uri is None or uri in silent:
                self.report.left += seen.events
                if uri is not None:
                    self.report.errors.append(
                        f"{where}: left for later, its server {redact(uri)} did not answer; "
                        f"{seen.events} events stay in the spool for the next sync"
                    )
                self._summary()
                return
            transport = make_transport(uri, self.request_timeout)
            source = SegmentSource(segments, seen.done, seen.settled, self.report)
            try:
                # before any segment is deleted: a replay cut short must not forget them
                self._end_orphans(transport, seen, not_orphans)
                asyncio.run(self._dispatch(source, _ReplayTransport(transport, source), uri))
            except GaveUp as exc:
                silent.add(uri)
                settled = self.ledger.sent + self.ledger.done + self.ledger.rejected
                left = seen.events - settled
                self.report.left += left
                self.report.errors.append(
                    f"{where}: left for later, its server {redact(uri)} did not answer in time "
                    f"({self.timeout:g} s: {exc}); {left} events stay in the spool for the "
                    "next sync"
                )
            finally:
                source.close()
                self.report.stored += self.ledger.sent + self.ledger.done
                self.report.refused.extend(self.ledger.take_rejections())
                if self.kept.events:
                    reason, count = self.kept.reason, self.kept.events
                    self.report.kept.append(KeptEvents(redact(uri), count, reason, str(where)))
                self.report.damaged.sort()  # segments settle in any order; report in theirs
                self._summary()
            if not any(where.glob("*.seg")):
                _remove_dir(where)

    def _summary(self) -> None:
        report = self.report
        kept = sum(k.count for k in report.kept)
        report.directories.append(
            f"{self.found.directory.name}: stored {report.stored} events, refused "
            f"{len(report.refused)}, {report.left + kept} left"
        )

    async def _dispatch(self, source: SegmentSource, transport: Transport, uri: str) -> None:
        # Metric batches of a run overlap against a server (it stores about twice as much
        # with calls in flight); a local store (sqlite) takes one writer at a time.
        in_flight = 4 if uri.startswith(("http://", "https://")) else 1
        jobs = _ReplayJobs(uri, self.policy)
        limiter = limiter_for(uri, in_flight) if in_flight > 1 else None
        dispatcher = Dispatcher(
            source,
            transport,
            self.ledger,
            jobs,
            in_flight,
            self.policy,
            limiter,
            self.kept,
            retry_kept=False,  # what the server held back stays on disk for a later sync
        )
        try:
            await dispatcher.pump(due=True)
            await dispatcher.settle()
        finally:
            dispatcher.close()
            jobs.close()

    def _uri(self) -> str | None:
        uri = self.override or self.found.owner.get("tracking_uri")
        where = self.found.directory
        if not isinstance(uri, str) or not uri:
            self.report.errors.append(f"{where}: no tracking URI; pass --tracking-uri")
            return None
        if "***@" in uri:
            # the spool never keeps credentials; the environment may hold this URI with them
            env = os.environ.get("MLFLOW_TRACKING_URI", "")
            if env and redact(env) == uri:
                return env
            self.report.errors.append(
                f"{where}: its tracking URI {uri} carried credentials, which the "
                "spool does not keep: pass the URI with them as --tracking-uri"
            )
            return None
        return uri

    def _end_orphans(self, transport: Transport, seen: Survey, not_orphans: set[str]) -> None:
        """Runs with no end spooled: their process died first (at its last write, at most)."""
        died = int(max(seen.mtimes, default=time.time()) * 1000)
        for run_id in sorted(seen.runs - seen.ended - not_orphans):
            if self.end_status is None:
                state = self._attempt(partial(transport.run_status, run_id))
                if state == "RUNNING":
                    self.report.open_runs.append(run_id)
                continue
            ended = self._attempt(
                partial(_end_if_running, transport, run_id, self.end_status, died)
            )
            if isinstance(ended, Held):
                self.report.errors.append(
                    f"run {run_id} not ended ({self.end_status}): {ended.reason}; a later "
                    "sync ends it"
                )
            elif isinstance(ended, Refused):
                self.report.refused.append(Rejection(run_id, "run", "status", ended.reason))
            elif ended:
                self.report.ended_runs.append(run_id)

    def _attempt(self, call: Callable[[], T]) -> T | Refused | Held:
        return self.policy.attempt_blocking(call, lambda exc: None)


def _end_if_running(transport: Transport, run_id: str, status: str, end_time: int) -> bool:
    # an end already stored (or set by someone else) keeps its status and time
    if transport.run_status(run_id) != "RUNNING":
        return False
    transport.end_run(run_id, status, end_time)
    return True


class SegmentSource:
    """A dead writer's segments, in order, as the dispatcher's source.

    Each segment is read whole when the dispatcher reaches it, less the records marked
    settled; once all its events are settled it is deleted (renamed ``.damaged`` if part
    of it could not be read), and the staged uploads it named go with it. What settled in
    a segment that stays (the sync was cut short) is marked in it at ``close``.
    """

    def __init__(
        self,
        segments: list[Path],
        finished: set[str],
        settled: set[tuple[int, int]],
        report: SyncReport,
    ) -> None:
        self._segments, self._finished, self._report = segments, finished, report
        self._skip = settled  # (segment, record start) the writer marked settled
        self._next = 0
        self._records: deque[tuple[list[Any], tuple[int, int]]] = deque()
        self._outstanding: dict[int, int] = {}
        self._read: dict[int, spool.Segment] = {}
        self._uploaded: dict[int, list[str]] = {}
        self.end_times: dict[str, int] = {}  # run -> its end time, when its end was read
        self._last_metric: dict[str, float] = {}
        self._handed: deque[tuple[int, int]] = deque()  # (index + 1, start) of chunks out
        self._settled_chunks = 0
        self._marks: dict[int, list[int]] = {}  # index + 1 -> starts of records settled

    def next_chunk(self) -> tuple[int, list[Any]] | None:
        while not self._records:
            if self._next >= len(self._segments):
                return None
            self._open(self._next)
            self._next += 1
        chunk, record = self._records.popleft()
        self._handed.append(record)
        return self._next, chunk

    def _open(self, index: int) -> None:
        path, number = self._segments[index], index + 1
        try:
            mtime = path.stat().st_mtime
            segment = spool.read_segment(path)
        except OSError as exc:  # the segment, and so the directory, stays
            self._report.errors.append(f"cannot read {path}: {exc.strerror or exc}")
            return
        self._read[number] = segment
        count = 0
        for start, events in segment.spans():
            event = partial(self._event, mtime, (segment.number, start) in self._skip)
            chunk = [e for e in map(event, events) if e is not None]
            count += len(chunk)
            if chunk:
                self._records.append((chunk, (number, start)))
        self._outstanding[number] = count
        if not count:
            self._settled(number)

    def _event(self, mtime: float, skip: bool, event: Any) -> Any:
        if type(event) is tuple:
            when = to_seconds(event[3])
            self._last_metric[event[0]] = max(self._last_metric.get(event[0], 0), when)
            return None if skip else event
        if isinstance(event, (spool.ArtifactDone, spool.Settled)):
            return None  # a marker, not an event
        if isinstance(event, (spool.Artifact, spool.Model)):  # settled by their own marker
            if event.path in self._finished:  # its writer stored or reported it
                return None
            return _upload_job(event) if isinstance(event, spool.Artifact) else _model_job(event)
        if skip:
            return None
        if isinstance(event, MetaEvent) and event.kind == "end" and event.when is None:
            # An older spool's end has no time: it was written before the segment's last
            # write, and usually just after the run's last metric
            when = min(self._last_metric.get(event.run_id, mtime), mtime)
            self.end_times[event.run_id] = int(when * 1000)
        return event

    def settled(self, chunks: int, now: bool) -> None:
        for _ in range(chunks - self._settled_chunks):
            if not self._handed:
                break
            number, start = self._handed.popleft()
            self._settled_chunks += 1
            self._marks.setdefault(number, []).append(start)

    def close(self) -> None:
        """Mark what settled in each segment that stays (the segment's mtime kept: it
        stands for when the writer died)."""
        for number, starts in self._marks.items():
            segment = self._read.get(number)
            if segment is None or segment.damage:  # deleted, or markers would not be read
                continue
            path = segment.path
            with contextlib.suppress(OSError):
                before = path.stat()
                with open(path, "ab") as file:
                    file.write(spool.settled_record((segment.number, s) for s in starts))
                os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        self._marks.clear()

    def ack(self, segment: int, count: int) -> None:
        left = self._outstanding[segment] = self._outstanding.get(segment, 0) - count
        if left <= 0:
            self._settled(segment)

    def note_done(self, job: Job, segment: int, stored: bool) -> None:
        if stored and job.spooled is not None:  # a refused upload's copy stays staged
            self._uploaded.setdefault(segment, []).append(job.spooled[0])

    def _settled(self, number: int) -> None:
        segment = self._read.pop(number, None)
        if segment is None:
            return
        path = segment.path
        try:
            if segment.damage:
                path.rename(path.with_name(path.name + ".damaged"))
                count = sum(len(events) for _, events in segment.records)
                self._report.damaged.append(
                    f"{path}: {segment.damage}; {len(segment.records)} records ({count} events)"
                    f" replayed, {segment.lost_bytes} bytes lost; kept as {path.name}.damaged"
                )
            else:
                path.unlink()
        except OSError as exc:
            self._report.errors.append(f"cannot remove the replayed {path}: {exc.strerror}")
            return
        for staged in self._uploaded.pop(number, []):  # only now: a cut-short sync redoes them
            _remove_staged(Path(staged))


class _ReplayTransport:
    """The directory's transport, but a run's end goes only to a run still RUNNING, with
    its own time (or, from an older spool, the time its process last wrote for it)."""

    def __init__(self, inner: Transport, source: SegmentSource) -> None:
        self._inner, self._source = inner, source
        self.log_batch = inner.log_batch
        self.run_status = inner.run_status
        self.run_tags = inner.run_tags
        self.refresh = inner.refresh

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        _end_if_running(self._inner, run_id, status, self._source.end_times.get(run_id, end_time))


def _upload_job(artifact: spool.Artifact) -> Job:
    """A staged file, or a staging area (a directory laid out as run-relative paths)."""
    run_id, path, artifact_path = artifact.run_id, artifact.path, artifact.artifact_path

    async def work(jobs: Any) -> None:
        await jobs.upload(run_id, path, artifact_path)

    return Job(run_id, "artifact", path, work, spooled=(path, artifact_path))


def _model_job(record: spool.Model) -> Job:
    """A ``log_model`` its process did not finish: the whole flow again, from the staged
    files (a logged model the dead process had created stays PENDING beside the new one)."""
    run_id, area, spec = record.run_id, record.path, record.spec

    async def work(jobs: Any) -> None:
        from asynctrack._artifacts.models import replayed

        await replayed(run_id, area, spec, jobs.tracking_uri).work(jobs)

    return Job(run_id, "model", str(spec.get("name", area)), work, spooled=(area, spec))


class _ReplayJobs:
    """What replayed uploads need of a job context: blocking calls and the retry policy."""

    config = EngineConfig()

    def __init__(self, uri: str, policy: RetryPolicy) -> None:
        self._uri, self._policy = uri, policy
        self._pool = DaemonPool(4, "asynctrack-sync-io")
        self._client: Any = None
        self.resources = Resources()
        self.files = FileCounters()

    @property
    def tracking_uri(self) -> str:
        return self._uri

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        return await self._pool.run(fn)

    def note_transient(self, reason: str) -> None:
        return None

    def spooled(self) -> int:
        return 0

    async def upload(self, run_id: str, path: str, artifact_path: str | None) -> None:
        def call() -> None:
            if self._client is None:
                from asynctrack._gate import plain_client

                self._client = plain_client(self._uri)
            try:
                if os.path.isdir(path):
                    self._client.log_artifacts(run_id, path, artifact_path)
                elif os.path.isfile(path):
                    self._client.log_artifact(run_id, path, artifact_path)
                else:  # its writer did not finish it, and the staged copy is gone
                    raise Refused("lost: the staged copy is gone", splittable=False)
            except (Refused, Transient):
                raise
            except Exception as exc:
                raise sort_mlflow_error(exc) from None

        result = await self._policy.attempt(lambda: self.run_blocking(call), lambda exc: None)
        if isinstance(result, Refused):  # what is still staged stays where it is
            raise RuntimeError(result.reason)

    def close(self) -> None:
        self._pool.close()


def _remove_dir(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / "lock").unlink()
    # damaged segments stay for inspection, with owner.json naming their writer
    if all(p.name == "owner.json" for p in directory.iterdir()):
        with contextlib.suppress(OSError):
            (directory / "owner.json").unlink()
            directory.rmdir()


def _remove_staged(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    # <staging dir>/asynctrack-<pid>-*/engine-*/<area>: the dead process's, once empty
    for parent in list(path.parents)[:2]:
        if not parent.name.startswith(("engine-", "asynctrack-")):
            break
        with contextlib.suppress(OSError):
            parent.rmdir()
