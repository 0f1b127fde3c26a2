"""Intake: from the callers' queue to the worker's window, through the spool; the
dispatcher's source on the live path (``next_chunk`` / ``ack``).

The worker's intake takes every event off the callers' deque a few times a second, appends
it to the spool (one record per chunk) and keeps it in an in-memory window for sending.
Taking never waits for the server: when the window is full (the server is slow or away),
events go to the spool only, and the worker reads them back from disk, in order, once the
window has room again. So a long outage costs disk, not the caller's time, and memory
stays bounded. Without a spool, intake stops at a full window and callers meet the
queue's capacity as before.

Each event is counted against the spool segment it was written to; a segment is removed
once it is sealed and all its events are stored or reported. Within a segment, the
dispatcher says how many chunks handed to it are settled, in order (``settled``); the
intake knows which record each chunk came from and appends a small marker record naming
the settled ones, at most every ``MARK_INTERVAL`` (and at a flush), so that ``sync`` and
``status`` after a crash count and send only what the server does not have.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from asynctrack._engine import spool
from asynctrack._engine.batching import MAX_METRICS
from asynctrack._engine.events import Barrier, Event, Job, resolve_chunk
from asynctrack._engine.queue import EventQueue
from asynctrack.errors import Rejection

logger = logging.getLogger("asynctrack")

CHUNK = 256  # events per spool record, and per slice of worker time between GIL yields
MARK_INTERVAL = 0.1  # seconds between "settled" marker records, at most (a flush: at once)

Position = tuple[int, int]  # (segment, byte offset)
Record = Position | None  # where a chunk's events are spooled (its record's start); None: not


class Intake:
    def __init__(self, queue: EventQueue, writer: spool.Writer | None, window: int) -> None:
        self.queue = queue
        self.writer = writer
        self.window = window
        #: (segment, events, record) ready for the sender; segment 0: not spooled.
        self.mem: deque[tuple[int, list[Any], Record]] = deque()
        self.mem_events = 0
        #: The first record not in memory, while a backlog is on disk only.
        self.backlog: Position | None = None
        self._backlog_barriers: deque[tuple[Position, Barrier]] = deque()
        self.outstanding: dict[int, int] = {}
        self._settled_chunks = 0
        #: The record of each chunk handed to the dispatcher and not yet settled, in order.
        self._handed: deque[Record] = deque()
        self._marks: list[Position] = []  # settled records not yet marked in the spool
        self._last_mark = 0.0
        self.spooled = 0  # events written to the spool, ever
        self.durable = 0  # events fsync'ed, ever
        self._last_sync = time.monotonic()
        self.error = ""  # the spool's failure, while it fails, for messages
        self._warned = ""
        #: Events taken out of their chunk because their value could not be converted.
        self.refused: list[Rejection] = []
        #: A flush barrier was taken since the worker last looked: send now. Kept here,
        #: on the worker's side, because a caller's wake can be consumed before the
        #: barrier it announces is taken.
        self.barrier_taken = False

    # ------------------------------------------------------------------ taking

    def pull(self, everything: bool = False) -> int:
        """Take what is queued; return how many events (barriers not counted).
        ``everything``: also past the window (at exit, to disk)."""
        queue, taken = self.queue, 0
        while len(queue):
            if self.writer is None and self.mem_events >= self.window and not everything:
                break  # no spool: callers meet the queue's capacity
            chunk = queue.take(CHUNK)
            record = self._encode(chunk)
            barriers = sum(1 for e in chunk if type(e) is Barrier)
            self.barrier_taken |= barriers > 0
            room = self.backlog is None and (self.mem_events < self.window or everything)
            at = self._spool(record, len(chunk) - barriers)
            if at is None and self.writer is not None and not room:
                # The spool failed (disk full, limit reached) and memory is full: leave
                # the events queued; callers meet the queue's capacity, told why.
                queue.give_back(chunk)
                break
            taken += len(chunk) - barriers
            if at is None:  # not spooled: memory is the only copy
                self._keep(0, chunk)
            elif room:
                self._keep(at[0], chunk, (at[0], at[1]) if at[1] < at[2] else None)
            else:
                self._spill(at, chunk)
        queue.notify_room()
        return taken

    def _encode(self, chunk: list[Event]) -> bytes | None:
        if self.writer is None:
            return None
        try:
            return spool.encode(chunk)
        except ValueError:  # a value queued unconverted (a device tensor): convert it now
            self.refused.extend(resolve_chunk(chunk))
        try:
            return spool.encode(chunk)
        except ValueError as exc:  # cannot happen with built-in types; kept in memory only
            logger.error("asynctrack: a chunk of events cannot be spooled: %s", exc)
            return None

    def _spool(self, record: bytes | None, count: int) -> tuple[int, int, int] | None:
        """Append one encoded chunk; return (segment, its start, its end), or None."""
        writer = self.writer
        if writer is None or record is None:
            return None
        try:
            if writer.full():
                writer.open_segment()
                self._seal(writer.segment - 1)
            start = writer.size
            if count:
                writer.append(record)
        except spool.SpoolError as exc:
            if str(exc) != self._warned:  # once per kind of failure, not per chunk
                logger.warning("asynctrack: %s; events are kept in memory only", exc)
                self._warned = str(exc)
            self.error = str(exc)
            return None
        self.error = ""
        segment = writer.segment
        self.outstanding[segment] = self.outstanding.get(segment, 0) + count
        self.spooled += count
        return segment, start, writer.size

    def _keep(self, segment: int, events: list[Any], record: Record = None) -> None:
        self.mem.append((segment, events, record))
        self.mem_events += len(events)

    def _spill(self, at: tuple[int, int, int], chunk: list[Event]) -> None:
        """The chunk stays on disk only; barriers and jobs wait in memory for their turn."""
        segment, start, end = at
        if self.backlog is None:
            self.backlog = (segment, start)
        for event in chunk:
            if type(event) is Barrier:
                self._backlog_barriers.append(((segment, end), event))
            elif isinstance(event, Job):
                # A job's work is code, not data: it runs from memory. Uploads are
                # independent of the events around them; run ends wait for all jobs.
                self._keep(segment, [event])

    @property
    def full(self) -> bool:
        """Enough in memory to send now: a full batch, or (without a spool) a full window
        that callers wait on."""
        return self.mem_events >= min(MAX_METRICS, self.window)

    def next_chunk(self) -> tuple[int, list[Any]] | None:
        """The next chunk for the dispatcher, from memory or, past the window, from disk."""
        if not self.mem:
            self.read_backlog()
            if not self.mem:
                return None
        segment, chunk, record = self.mem.popleft()
        self.mem_events -= len(chunk)
        self._handed.append(record)
        return segment, chunk

    def read_backlog(self) -> None:
        """Bring records of the backlog into memory, up to the window, in order."""
        writer = self.writer
        while self.backlog is not None and writer is not None and self.mem_events < self.window:
            segment, offset = self.backlog
            if segment < writer.segment and offset >= writer.sizes.get(segment, 0):
                self.backlog = (segment + 1, len(spool.MAGIC))
                self._seal(segment)  # its events may all be settled already (jobs)
                continue
            if segment == writer.segment and offset >= writer.size:
                self.backlog = None  # caught up: back to sending straight from memory
                break
            read = spool.read_segment(writer.path(segment), start=offset, limit=self.window)
            if read.damage or not read.records:
                logger.error("asynctrack: spool %s unreadable (%s)", read.path, read.damage)
                self.error = f"spool segment {read.path} unreadable: {read.damage}"
                self.backlog = (segment + 1, len(spool.MAGIC))
                continue
            start = read.begin
            for end, events in read.records:
                # artifact records are handled by their jobs, which ran from memory; markers
                # are not events
                kept = [e for e in events if not isinstance(e, _NOT_SENT)]
                if kept:
                    self._keep(segment, kept, (segment, start))
                self.backlog, start = (segment, end), end
                while self._backlog_barriers and self._backlog_barriers[0][0] <= (segment, end):
                    self._keep(segment, [self._backlog_barriers.popleft()[1]])
        if self.backlog is None:
            while self._backlog_barriers:
                self._keep(0, [self._backlog_barriers.popleft()[1]])

    def note_done(self, job: Job, segment: int, stored: bool) -> None:
        """``job``'s upload is finished (stored, or refused for good): tell ``sync`` never
        to redo it, then let go of its staged copy. In that order: a crash between the two
        leaves a copy ``sync`` removes, never a record whose copy is gone."""
        if job.spooled is None:
            return
        if self.writer is not None:
            try:
                self.writer.append(spool.done_record(job.run_id, job.spooled[0]))
            except spool.SpoolError:
                return  # the copy stays: a sync after a crash would upload it again
        spool.remove_staged(Path(job.spooled[0]))

    # ------------------------------------------------------------------ settling

    def settled(self, chunks: int, now: bool) -> None:
        """The first ``chunks`` chunks ever handed out are settled, but for their jobs (an
        upload has its own marker, ``note_done``). Their records are marked in the spool
        within ``MARK_INTERVAL``; ``now`` (a flush): before this returns."""
        handed = self._handed
        for _ in range(chunks - self._settled_chunks):
            if not handed:
                break
            record = handed.popleft()
            self._settled_chunks += 1
            if record is not None:
                self._marks.append(record)
        self.write_marks(now)

    def write_marks(self, now: bool = True) -> None:
        """Append one marker record for the settled records of segments still on disk;
        unless ``now``, only if ``MARK_INTERVAL`` has passed since the last one."""
        if not self._marks or not (now or time.monotonic() - self._last_mark >= MARK_INTERVAL):
            return
        writer, marks = self.writer, self._marks
        self._marks, self._last_mark = [], time.monotonic()
        live = [m for m in marks if m[0] in writer.sizes] if writer is not None else []
        if writer is None or not live:
            return
        # Lost (a full disk, the spool's limit): those events would only be sent again.
        with contextlib.suppress(spool.SpoolError):
            writer.append(spool.settled_record(live))

    def ack(self, segment: int, count: int) -> None:
        """``count`` events of ``segment`` are stored or reported."""
        if not segment:
            return
        left = self.outstanding[segment] = self.outstanding.get(segment, 0) - count
        if left <= 0:
            self._seal(segment)

    def _seal(self, segment: int) -> None:
        """Drop ``segment`` if it is complete, settled, and behind the backlog."""
        writer = self.writer
        if writer is None or self.outstanding.get(segment, 0) > 0:
            return
        if segment >= writer.segment:
            return  # still being written
        if self.backlog is not None and segment >= self.backlog[0]:
            return  # still to be read back
        self.outstanding.pop(segment, None)
        writer.drop(segment)

    @property
    def waiting(self) -> int:
        """Events in the spool not yet stored."""
        return sum(n for n in self.outstanding.values() if n > 0)

    # ------------------------------------------------------------------ durability

    def sync_due(self, interval: float) -> bool:
        return (
            self.writer is not None
            and self.durable < self.spooled
            and time.monotonic() - self._last_sync >= interval
        )

    def sync(self) -> None:
        """fsync (on a worker thread): everything spooled before the call becomes durable."""
        target = self.spooled
        self._last_sync = time.monotonic()
        if self.writer is not None:
            self.writer.sync()
        self.durable = max(self.durable, target)

    def close(self) -> None:
        if self.writer is not None:
            self.write_marks()
            with contextlib.suppress(OSError):
                self.writer.close(empty=self.waiting == 0)


_NOT_SENT = (spool.Artifact, spool.Model, spool.ArtifactDone, spool.Settled)
_reported: set[str] = set()


def report_orphans(root: Path, recover: bool) -> None:
    """Say on stderr (once per process) when spools of processes that died wait under
    ``root``; with ``recover``, replay them on a background thread."""
    key = str(root)
    if key in _reported:
        return
    _reported.add(key)
    orphans = [d for d in spool.scan(root) if not d.alive and d.segments]
    if not orphans:
        return
    size = sum(d.size for d in orphans)
    if recover:
        sys.stderr.write(
            f"asynctrack: replaying {len(orphans)} spool(s) left by processes that ended "
            f"({size} bytes) from {root}\n"
        )
        # A daemon: exit never waits for it; what it has not sent stays for the next sync.
        threading.Thread(
            target=_recover, args=(root,), name="asynctrack-recover", daemon=True
        ).start()
        return
    sys.stderr.write(
        f"asynctrack: {len(orphans)} spool(s) left by processes that ended hold events not "
        f"yet stored ({size} bytes) in {root}; run `asynctrack sync {shlex.quote(key)}` "
        "to send them\n"
    )


def _recover(root: Path) -> None:
    from asynctrack._engine.replay import replay

    try:
        report = replay(root)
    except Exception:
        logger.exception("asynctrack: replaying the spools in %s failed", root)
        return
    if not report.ok:
        logger.warning("asynctrack: spool replay from %s: %s", root, report)
