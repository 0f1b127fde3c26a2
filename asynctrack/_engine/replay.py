"""Replaying what dead processes left in the spool: ``asynctrack sync`` and ``status``.

Replay holds a writer directory's lock while it works, so neither a live writer nor a second
sync is raced: a held lock means "skip and report". Events go out as the worker sends them:
metrics per run in calls of at most 1000, params and tags through ``pack_meta``, a run's end
only after everything before it for that run. A segment is deleted only once each of its
events is stored or refused, so a sync cut short sends some again next time; harmless: the
server ignores a metric stored twice (same key, step, timestamp, value) and a param re-logged
with its value, and an end goes only to a run the server still shows RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from asynctrack._engine import spool
from asynctrack._engine.batching import MAX_METRICS, pack_meta
from asynctrack._engine.events import MetaEvent, Metric, to_seconds
from asynctrack._engine.transport import (
    _TRANSIENT_STATUS,
    Refused,
    Transient,
    Transport,
    _error_of,
    _short,
    make_transport,
    redact,
)
from asynctrack.errors import Rejection

T = TypeVar("T")
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 15.0
_REQUEST_TIMEOUT = 30.0
_IN_FLIGHT = 4  # metric batches sent at once
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MlflowException codes meaning "away or busy", as StoreTransport reads them
_TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED")


@dataclass
class SyncReport:
    """What one replay did; ``ok`` when every event found was stored."""

    stored: int = 0
    refused: list[Rejection] = field(default_factory=list)
    left: int = 0  # events still on disk: the deadline passed, or a directory was not sent
    damaged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # directories in use
    ended_runs: list[str] = field(default_factory=list)  # no end spooled: ended with `status`
    open_runs: list[str] = field(default_factory=list)  # no end spooled, left RUNNING
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.refused or self.left or self.damaged or self.errors)


@dataclass
class DirStatus:
    """One writer directory as ``asynctrack status`` shows it."""

    directory: Path
    pid: int | None
    host: str
    alive: bool
    segments: int
    bytes: int
    events: int
    runs: list[str]
    since: float | None  # seconds: the oldest metric's timestamp, else oldest segment's mtime
    damage: list[str]


@dataclass
class _Survey:
    """A directory read once before anything is sent."""

    paths: list[Path]
    events: int = 0
    runs: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    oldest: float | None = None
    damage: list[str] = field(default_factory=list)
    mtimes: list[float] = field(default_factory=list)
    done: set[str] = field(default_factory=set)  # uploads their writer finished


def _survey(paths: list[Path], writing: bool = False) -> _Survey:
    survey = _Survey(paths)
    for path in paths:
        try:
            survey.mtimes.append(path.stat().st_mtime)
            segment = spool.read_segment(path)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):  # else a live writer just dropped it
                survey.damage.append(f"{path.name}: cannot read: {exc.strerror or exc}")
            continue
        for _, events in segment.records:
            for event in events:
                if isinstance(event, spool.ArtifactDone):  # a marker, not an event
                    survey.done.add(event.path)
                    continue
                survey.events += 1
                if type(event) is tuple:
                    survey.runs.add(event[0])
                    when = to_seconds(event[3])
                    if survey.oldest is None or when < survey.oldest:
                        survey.oldest = when
                else:
                    survey.runs.add(event.run_id)
                    if isinstance(event, MetaEvent) and event.kind == "end":
                        survey.ended.add(event.run_id)
        # a live writer's last record may be half written: not damage
        if segment.damage and not (writing and path == paths[-1]):
            survey.damage.append(f"{path.name}: {segment.damage} ({segment.lost_bytes} bytes lost)")
    return survey


def _writer_dirs(root: Path) -> list[spool.SpoolDir]:
    if (root / "lock").exists():  # one writer's directory, not the root
        return [d for d in spool.scan(root.parent) if d.directory.name == root.name]
    return spool.scan(root)


def status(root: Path) -> list[DirStatus]:
    """Every writer directory under ``root`` (or ``root`` itself) and what it holds."""
    result = []
    for d in _writer_dirs(root):
        survey = _survey(d.segments, writing=d.alive)
        since = survey.oldest if survey.oldest is not None else min(survey.mtimes, default=None)
        pid = d.owner.get("pid")
        result.append(
            DirStatus(d.directory, pid if isinstance(pid, int) else None,
                      str(d.owner.get("host", "?")), d.alive, len(d.segments), d.size,
                      survey.events, sorted(survey.runs), since, survey.damage)
        )  # fmt: skip
    return result


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
    ``tracking_uri`` is given. While the server is away, requests are retried with backoff
    until ``timeout`` seconds pass without an answer; what is left stays on disk.
    ``progress(n)`` is called with each number of events stored or refused.
    """
    if status is not None and status not in _STATUSES:
        raise ValueError(f"status must be one of {', '.join(_STATUSES)} or None, got {status!r}")
    replayer = _Replayer(status, tracking_uri, timeout, progress)
    found = _writer_dirs(root)
    for d in found:  # a run a live process logs to, or another directory ends, is no orphan
        survey = _survey(d.segments, writing=d.alive)
        replayer.not_orphans |= survey.runs if d.alive else survey.ended
        if not d.alive:  # a dead writer's segments only ever go away: reused if all there
            replayer.surveys[d.directory] = survey
    try:
        for d in found:
            replayer.directory(d)
    finally:
        replayer.close()
    return replayer.report


@dataclass
class _Run:
    """One run's events of a segment, up to its end."""

    metrics: list[Metric] = field(default_factory=list)
    meta: list[MetaEvent] = field(default_factory=list)
    artifacts: list[spool.Artifact] = field(default_factory=list)


class _Deadline(Exception):
    """The timeout passed while the server was away."""


class _Replayer:
    def __init__(
        self,
        status: str | None,
        override: str | None,
        timeout: float,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.report = SyncReport()
        self._status, self._override, self._progress = status, override, progress
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._request_timeout = min(_REQUEST_TIMEOUT, max(timeout, 1.0))
        self._last_error, self._uri = "", ""
        self._silent: set[str] = set()  # servers that did not answer in this sync
        self._transport: Transport | None = None
        self._client: Any = None
        self._waiting = 0  # events of the current directory neither stored nor refused
        self._last_metric: dict[str, float] = {}  # run -> newest metric timestamp seen
        self._uploaded: list[str] = []  # staged files of the current segment now stored
        self._finished: set[str] = set()  # uploads the writer finished itself
        self.not_orphans: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.surveys: dict[Path, _Survey] = {}

    def directory(self, found: spool.SpoolDir) -> None:
        where = found.directory
        with spool.claim(where) as fd:
            if fd is None:
                owner = found.owner
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
            survey = self.surveys.get(where)
            if survey is None or survey.paths != segments:  # another sync took some meanwhile
                survey = _survey(segments)
            self._waiting = survey.events
            uri = self._uri_for(found)
            if uri is None:
                self.report.left += self._waiting
                return
            if uri in self._silent:  # waited for once already: not again for each directory
                self.report.left += self._waiting
                self.report.errors.append(
                    f"{where}: left for later, its server {redact(uri)} did not answer; "
                    f"{self._waiting} events stay in the spool for the next sync"
                )
                return
            # Each directory has a deadline of its own: a server that is gone for good (an
            # old laptop's URI) must not keep any other directory from being recovered.
            self._deadline = time.monotonic() + self._timeout
            self._uri, self._transport, self._client = uri, None, None
            self._finished = survey.done
            self._last_metric = {}
            try:
                # before any segment is deleted: a replay cut short must not forget them
                self._end_orphans(survey, max(survey.mtimes, default=time.time()))
                for path in segments:
                    self._segment(path)
            except _Deadline:
                self._silent.add(uri)
                self.report.left += self._waiting
                self.report.errors.append(
                    f"{where}: left for later, its server {redact(uri)} did not answer in time "
                    f"({self._timeout:g} s: {self._last_error}); {self._waiting} events stay in "
                    "the spool for the next sync"
                )
                return
            if not any(where.glob("*.seg")):
                _remove_dir(where)

    def _uri_for(self, found: spool.SpoolDir) -> str | None:
        uri = self._override or found.owner.get("tracking_uri")
        if not isinstance(uri, str) or not uri:
            self.report.errors.append(f"{found.directory}: no tracking URI; pass --tracking-uri")
            return None
        if "***@" in uri:
            # the spool never keeps credentials; the environment may hold this URI with them
            env = os.environ.get("MLFLOW_TRACKING_URI", "")
            if env and redact(env) == uri:
                return env
            self.report.errors.append(
                f"{found.directory}: its tracking URI {uri} carried credentials, which the "
                "spool does not keep: pass the URI with them as --tracking-uri"
            )
            return None
        return uri

    def _end_orphans(self, survey: _Survey, died: float) -> None:
        """Runs with no end spooled: their process died first (at its last write, at most)."""
        for run_id in sorted(survey.runs - survey.ended - self.not_orphans):
            if self._status is None:
                if self._attempt(partial(self._run_status, run_id)) == "RUNNING":
                    self.report.open_runs.append(run_id)
                continue
            end = partial(self._end_if_running, run_id, self._status, int(died * 1000))
            ended = self._attempt(end)
            if isinstance(ended, Refused):
                self.report.refused.append(Rejection(run_id, "run", "status", ended.reason))
            elif ended:
                self.report.ended_runs.append(run_id)

    def _segment(self, path: Path) -> None:
        try:
            mtime = path.stat().st_mtime
            segment = spool.read_segment(path)
        except OSError as exc:  # the segment, and so the directory, stays
            self.report.errors.append(f"cannot read {path}: {exc.strerror or exc}")
            return
        runs: dict[str, _Run] = {}
        self._uploaded = []
        for _, events in segment.records:
            for event in events:
                if type(event) is tuple:
                    runs.setdefault(event[0], _Run()).metrics.append(event)
                    when = to_seconds(event[3])
                    self._last_metric[event[0]] = max(self._last_metric.get(event[0], 0), when)
                elif isinstance(event, spool.ArtifactDone):
                    continue
                elif isinstance(event, spool.Artifact):
                    if event.path in self._finished:  # its writer stored or reported it
                        self._done(1)
                    else:
                        runs.setdefault(event.run_id, _Run()).artifacts.append(event)
                elif event.kind == "end":
                    self._send_run(event.run_id, runs.pop(event.run_id, _Run()))
                    # the end was written before the segment's last write, and usually just
                    # after the run's last metric
                    when = min(self._last_metric.get(event.run_id, mtime), mtime)
                    self._end(event.run_id, event.value, int(when * 1000))
                else:
                    runs.setdefault(event.run_id, _Run()).meta.append(event)
        for run_id, run in runs.items():
            self._send_run(run_id, run)
        try:
            if segment.damage:
                path.rename(path.with_name(path.name + ".damaged"))
                count = sum(len(events) for _, events in segment.records)
                self.report.damaged.append(
                    f"{path}: {segment.damage}; {len(segment.records)} records ({count} events)"
                    f" replayed, {segment.lost_bytes} bytes lost; kept as {path.name}.damaged"
                )
            else:
                path.unlink()
        except OSError as exc:
            self.report.errors.append(f"cannot remove the replayed {path}: {exc.strerror}")
            return
        for staged in self._uploaded:  # only now: a replay cut short must find them again
            _remove_staged(Path(staged))

    def _send_run(self, run_id: str, run: _Run) -> None:
        batches = [
            run.metrics[start : start + MAX_METRICS]
            for start in range(0, len(run.metrics), MAX_METRICS)
        ]
        if len(batches) > 1 and self._uri.startswith(("http://", "https://")):
            # Metrics carry their own step and time, so their calls may overlap; the server
            # stores about twice as much with calls in flight, as the worker's are.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_IN_FLIGHT, thread_name_prefix="asynctrack-sync")
            futures = [self._pool.submit(self._send, run_id, b) for b in batches]
            wait(futures)  # all of them: none may outlive this directory's replay
            for future in futures:
                future.result()  # a _Deadline in any of them ends this directory's replay
        else:
            for batch in batches:
                self._send(run_id, batch)
        meta = pack_meta(run_id, run.meta)
        self._done(len(run.meta) - sum(len(b) for b in meta))  # folded repeats: stored
        for meta_batch in meta:
            self._send(run_id, meta_batch.events())
        for artifact in run.artifacts:
            self._artifact(artifact)

    def _send(self, run_id: str, items: list[Any]) -> None:
        """Metrics, or params and tags, in one ``log_batch``."""
        transport = self._get_transport()
        if type(items[0]) is tuple:
            call = partial(transport.log_batch, run_id, items, (), ())
        else:
            params = [(e.key, e.value) for e in items if e.kind == "param"]
            tags = [(e.key, e.value) for e in items if e.kind == "tag"]
            call = partial(transport.log_batch, run_id, (), params, tags)
        refused = self._attempt(call)
        if not isinstance(refused, Refused):
            self._done(len(items))
        elif refused.splittable and len(items) > 1:  # one bad event must not sink the others
            self._send(run_id, items[: len(items) // 2])
            self._send(run_id, items[len(items) // 2 :])
        else:
            self._refuse(
                Rejection(run_id, "metric", i[1], refused.reason)
                if type(i) is tuple
                else Rejection(run_id, i.kind, i.key, refused.reason)
                for i in items
            )

    def _end(self, run_id: str, status: str, end_time: int) -> None:
        ended = self._attempt(partial(self._end_if_running, run_id, status, end_time))
        if isinstance(ended, Refused):
            self._refuse([Rejection(run_id, "run", "status", ended.reason)])
        else:
            self._done(1)

    def _artifact(self, artifact: spool.Artifact) -> None:
        """A staged file, or a staging area (a directory laid out as run-relative paths)."""
        run_id, path, artifact_path = artifact.run_id, artifact.path, artifact.artifact_path

        def upload() -> None:
            client = self._get_client()
            if os.path.isdir(path):
                _classified(partial(client.log_artifacts, run_id, path, artifact_path))
            elif os.path.isfile(path):
                _classified(partial(client.log_artifact, run_id, path, artifact_path))
            else:  # its writer did not finish it, and the staged copy is gone
                raise Refused("lost: the staged copy is gone", splittable=False)

        refused = self._attempt(upload)
        if isinstance(refused, Refused):  # what is still staged stays where it is
            self._refuse([Rejection(run_id, "artifact", path, refused.reason)])
        else:
            self._uploaded.append(path)
            self._done(1)

    def _attempt(self, call: Callable[[], T]) -> T | Refused:
        """Call until it returns or is refused, backing off with jitter while the server is
        away, until ``timeout`` seconds pass without an answer."""
        delay = _BACKOFF_FIRST
        while True:
            try:
                result: T | Refused = call()
            except Transient as exc:
                self._last_error = str(exc)
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise _Deadline from None
                time.sleep(min(delay * random.uniform(0.5, 1.5), remaining))
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            except Refused as exc:
                result = exc
            except Exception as exc:  # one record that cannot be sent must not stop the sync
                result = Refused(_short(f"not sent: {type(exc).__name__}: {exc}"), True)
            # an answer: a long replay is not cut short by a brief outage late in it
            self._deadline = time.monotonic() + self._timeout
            return result

    def _end_if_running(self, run_id: str, status: str, end_time: int) -> bool:
        # an end already stored (or set by someone else) keeps its status and time
        if self._run_status(run_id) != "RUNNING":
            return False
        self._get_transport().end_run(run_id, status, end_time)
        return True

    def _run_status(self, run_id: str) -> str:
        if not self._uri.startswith(("http://", "https://")):
            return str(_classified(lambda: self._get_client().get_run(run_id).info.status))
        from mlflow.exceptions import MlflowException
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:  # not MlflowClient.get_run: its retries take minutes against a dead server
            response = http_request(
                get_default_host_creds(self._uri), "/api/2.0/mlflow/runs/get", "GET",
                max_retries=0, backoff_factor=0, retry_codes=(), raise_on_status=False,
                timeout=self._request_timeout, params={"run_id": run_id},
            )  # fmt: skip
        except MlflowException as exc:
            raise Transient(_short(str(exc))) from None
        if response.status_code == 200:
            return str(response.json()["run"]["info"]["status"])
        if response.status_code in _TRANSIENT_STATUS:
            raise Transient(f"HTTP {response.status_code}")
        code, message = _error_of(response.text)
        raise Refused(f"{code or 'HTTP ' + str(response.status_code)}: {_short(message)}", False)

    def _get_transport(self) -> Transport:
        if self._transport is None:
            self._transport = make_transport(self._uri, self._request_timeout)
        return self._transport

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self._uri)
        return self._client

    def _done(self, count: int) -> None:
        with self._lock:  # metric batches finish on the pool's threads
            self.report.stored += count
            self._waiting -= count
            if count and self._progress is not None:
                self._progress(count)

    def _refuse(self, rejections: Iterable[Rejection]) -> None:
        rejections = list(rejections)
        with self._lock:
            self.report.refused.extend(rejections)
            self._waiting -= len(rejections)
            if self._progress is not None:
                self._progress(len(rejections))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _classified(call: Callable[[], T]) -> T:
    """An MlflowClient call, its failures sorted as the transports sort theirs."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as exc:
        if exc.error_code in _TRANSIENT_CODES:
            raise Transient(_short(exc.message)) from None
        raise Refused(f"{exc.error_code}: {_short(exc.message)}", splittable=False) from None
    except OSError as exc:  # requests' connection errors are OSErrors too
        raise Transient(_short(f"{type(exc).__name__}: {exc}")) from None
    except Exception as exc:  # an artifact store's own error (S3 credentials...): reported
        raise Refused(_short(f"{type(exc).__name__}: {exc}"), splittable=False) from None


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
