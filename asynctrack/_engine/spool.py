"""The spool: what the worker takes off the queue, kept on local disk until it is stored.

Each engine of each process writes its own directory under the spool root::

    <root>/<host>-<pid>-<start ms>-<n>/
        owner.json      who wrote it: pid, host, start time, tracking URI (no credentials),
                        why requests took MLflow's own HTTP client (when they did)
        lock            held (flock) while the writer lives: a free lock means it died
        00000001.seg    segments, append-only, numbered in writing order
        staged/         copies of the files artifact calls logged (``STAGED``), one folder
                        per call, kept until the upload its record names is done

A segment starts with ``MAGIC`` (8 bytes, the last one the format version), then records:
a 4-byte big-endian payload length, the payload's CRC32, and the payload, a list of events
in the order they were queued, in ``marshal`` format 4 (stable across Python 3 versions).
A torn last record (a crash mid-write) or a damaged one ends the segment's readable part
there; the reader reports what it could not read. The CRC is checked before a payload is
decoded, so a damaged byte never reaches ``marshal``.

Events in a record: a metric is ``(run_id, key, value, time_s, step)``, the tuple as
queued; ``("p"|"t", run_id, key, value)`` for params and tags, ``("e", run_id, status,
end_ms)`` for a run's end (``end_ms`` absent in older spools), ``("a", run_id, staged,
{"label": label, "files": [[dest, size], ...]})`` for an artifact upload (``staged`` a
staging area laid out as run-relative paths; the files it must hold, so ``sync`` can tell
a copy that is gone; older spools have ``artifact_dir`` there, and ``staged`` may be one
file), ``("m", run_id, staged, spec)`` for a ``log_model`` and ``("d", run_id, staged)``
once the writer has finished that upload (stored, or refused for good), so ``sync`` skips
it. The writer removes a staged copy only after its ``"d"`` record is written.
``("s", segment, [offset, ...])`` marks records (by segment number and the byte offset
where the record starts) whose events the server has all stored or refused: ``sync`` and
``status`` skip their events (artifact uploads aside, which have ``"d"``). Markers are
written by the live worker a few times a second, in whichever segment it is writing; a
marker lost in a crash only means those events are sent again, which stores nothing twice.
``marshal`` writes a chunk of plain tuples at about 0.1 us an event and 40 bytes (a run id
repeated is written once); JSON took 1.3 us and 80 bytes.

Writes are plain ``os.write`` calls on the worker's thread; ``sync`` (fsync) is called by
the worker at most once per ``spool_sync_interval``, never per event, never by a caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import marshal
import os
import shutil
import socket
import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asynctrack._engine.events import Event, Job, MetaEvent

MAGIC = b"ATSPOOL\x02"  # version 2 added "s" markers; version 1 reads the same
_READABLE = (MAGIC, b"ATSPOOL\x01")
_HEADER = struct.Struct(">II")  # payload length, CRC32 of the payload
_MAX_RECORD = 256 * 1024 * 1024  # a larger length field can only be damage
_KINDS = {"param": "p", "tag": "t"}
#: The folder of a writer's directory that holds the staged copies its records name.
STAGED = "staged"


class SpoolError(OSError):
    """The spool cannot be written (read-only or full disk, limit reached); names the path."""


def default_root() -> Path:
    """A per-user directory: ``$XDG_STATE_HOME/asynctrack/spool`` (``~/.local/state/...``)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(state, "asynctrack", "spool")


# ------------------------------------------------------------------------------ records


def _plain(event: Event) -> tuple[Any, ...] | None:
    if type(event) is tuple:
        return event
    if isinstance(event, MetaEvent):
        if event.kind == "end":
            return ("e", event.run_id, event.value, event.when)
        return (_KINDS[event.kind], event.run_id, event.key, event.value)
    if isinstance(event, Job) and event.spooled is not None:
        return ("m" if event.kind == "model" else "a", event.run_id, *event.spooled)
    return None  # a barrier, or a job the spool cannot replay


def encode(events: Sequence[Event]) -> bytes:
    """One record (header and payload) of ``events``, barriers left out."""
    try:
        payload = marshal.dumps(events, 4)  # type: ignore[arg-type]  # metric tuples only: the common case
    except ValueError:
        payload = marshal.dumps([p for p in map(_plain, events) if p is not None], 4)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class Artifact:
    """An upload the spool remembers: its staging area and the files it holds (``files``:
    (run-relative path, size) pairs), or, from older spools, a staged file or area and
    its run-relative directory (``files`` None)."""

    run_id: str
    path: str
    artifact_path: str | None
    label: str = ""
    files: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class Model:
    """A ``log_model`` the spool remembers: its staging area and what the call asked for
    (``asynctrack._artifacts.models.spec``), so ``sync`` can log it after a crash."""

    run_id: str
    path: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class ArtifactDone:
    """The writer finished the upload of ``path`` (stored, or reported to the user)."""

    run_id: str
    path: str


@dataclass(frozen=True)
class Settled:
    """Records of ``segment`` (by start offset) whose events are all stored or refused."""

    segment: int
    offsets: tuple[int, ...]


def done_record(run_id: str, path: str) -> bytes:
    payload = marshal.dumps([("d", run_id, path)], 4)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def settled_record(records: Iterable[tuple[int, int]]) -> bytes:
    """One marker record for ``records``, (segment, start offset) pairs."""
    by_segment: dict[int, list[int]] = {}
    for segment, offset in records:
        by_segment.setdefault(segment, []).append(offset)
    payload = marshal.dumps([("s", s, offsets) for s, offsets in by_segment.items()], 4)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


Spooled = Any  # a metric tuple, a MetaEvent, an Artifact, a Model, an ArtifactDone or a Settled


def decode(payload: bytes) -> list[Spooled]:
    events: list[Spooled] = []
    for item in marshal.loads(payload):
        if len(item) == 5:
            events.append(item)
        elif item[0] == "e":
            when = item[3] if len(item) > 3 else None
            events.append(MetaEvent("end", item[1], "status", item[2], when))
        elif item[0] == "a":
            events.append(_artifact(item))
        elif item[0] == "m":
            events.append(Model(item[1], item[2], item[3]))
        elif item[0] == "d":
            events.append(ArtifactDone(item[1], item[2]))
        elif item[0] == "s":
            events.append(Settled(item[1], tuple(item[2])))
        else:
            events.append(MetaEvent("param" if item[0] == "p" else "tag", *item[1:]))
    return events


def _artifact(item: tuple[Any, ...]) -> Artifact:
    extra = item[3]
    if isinstance(extra, dict):
        files = tuple((str(dest), int(size)) for dest, size in extra["files"])
        return Artifact(item[1], item[2], None, str(extra.get("label", "")), files)
    return Artifact(item[1], item[2], extra)


def remove_staged(path: Path, parents: bool = False) -> None:
    """Remove a staged copy (a file, or a staging area); with ``parents``, also the
    per-process folders of the system's temporary directory that held it, once empty
    (``<staging dir>/asynctrack-<pid>-*/engine-*/<area>``, a dead process's)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    for parent in list(path.parents)[:2] if parents else ():
        if not parent.name.startswith(("engine-", "asynctrack-")):
            break
        with contextlib.suppress(OSError):
            parent.rmdir()


# ------------------------------------------------------------------------------ writer


class Writer:
    """One engine's spool directory: appends records, rotates and drops segments."""

    def __init__(
        self,
        root: Path,
        tracking_uri: str,
        segment_bytes: int,
        limit_bytes: int,
        mlflow_path: str | None = None,
    ) -> None:
        self.root = root
        self._segment_bytes = segment_bytes
        self._limit = limit_bytes
        self._lock_fd = -1
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns() // 1_000_000}"
            self.directory = _fresh_dir(root, name)
        except OSError as exc:
            raise SpoolError(f"cannot create a spool in {root}: {exc.strerror or exc}") from None
        try:
            self._lock_fd = os.open(self.directory / "lock", os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owner = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "tracking_uri": tracking_uri,
            }
            if mlflow_path:  # why requests take MLflow's own HTTP client (an auth plugin...)
                owner["mlflow_path"] = mlflow_path
            _write_private(self.directory / "owner.json", json.dumps(owner).encode())
        except OSError as exc:  # leave nothing that looks like a spool behind
            self.close(empty=True)
            raise SpoolError(f"cannot create a spool in {root}: {exc.strerror or exc}") from None
        self.segment = 0
        self._fd = -1
        self.size = 0
        self.total_bytes = 0  # on disk, all segments of this writer
        self.sizes: dict[int, int] = {}
        self.open_segment()

    def open_segment(self) -> int:
        """Seal the current segment (if any) and start the next; return the new number."""
        if self._fd >= 0:
            # Durable before it is closed: the periodic fsync covers only the open segment.
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
        self.segment += 1
        path = self.path(self.segment)
        try:
            self._fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o600)
            os.write(self._fd, MAGIC)
        except OSError as exc:
            self._fd = -1
            raise SpoolError(f"cannot write the spool segment {path}: {exc.strerror}") from None
        self.size = len(MAGIC)
        self.sizes[self.segment] = self.size
        self.total_bytes += self.size
        return self.segment

    def path(self, segment: int) -> Path:
        return self.directory / f"{segment:08d}.seg"

    def full(self) -> bool:
        return self.size >= self._segment_bytes

    def append(self, record: bytes) -> None:
        """Write one encoded record to the current segment (raises SpoolError, names the path)."""
        if self.total_bytes + len(record) > self._limit:
            raise SpoolError(f"spool limit of {self._limit} bytes reached in {self.directory}")
        try:
            written = os.write(self._fd, record)
        except OSError as exc:
            raise SpoolError(f"cannot write {self.path(self.segment)}: {exc.strerror}") from None
        if written != len(record):  # a full disk can take part of it: cut the torn tail
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise SpoolError(f"cannot write {self.path(self.segment)}: disk full")
        self.size += written
        self.sizes[self.segment] += written
        self.total_bytes += written

    def sync(self) -> None:
        """Make what is written durable. Called from a worker thread, never a caller's,
        while the worker goes on writing (a segment is made durable as it is sealed)."""
        fd = self._fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(fd)

    def drop(self, segment: int) -> None:
        """Remove a sealed segment whose events are all stored or reported."""
        with contextlib.suppress(FileNotFoundError):
            self.path(segment).unlink()
        self.total_bytes -= self.sizes.pop(segment, 0)

    def forget(self) -> None:
        """In a forked child: let go of the parent's files without touching them."""
        for fd in (self._fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._lock_fd = -1

    def close(self, empty: bool) -> None:
        """Stop writing; with ``empty`` (nothing left to store) remove the directory, and
        with it any staged copy (no record names one any more)."""
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
        if empty:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _fresh_dir(root: Path, name: str) -> Path:
    for n in range(1000):
        directory = root / f"{name}-{n}"
        try:
            directory.mkdir(mode=0o700)
            return directory
        except FileExistsError:
            continue
    raise SpoolError(f"cannot create a spool directory in {root}")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ reader


@dataclass
class Segment:
    """What could be read of one segment."""

    path: Path
    records: list[tuple[int, list[Spooled]]] = field(default_factory=list)  # (end offset, events)
    damage: str = ""  # why reading stopped early; empty when the whole file was read
    lost_bytes: int = 0  # bytes after the last good record
    begin: int = len(MAGIC)  # where the first record read starts

    @property
    def number(self) -> int:
        """The segment's number, from its name (``00000003.seg``); 0 if it has none."""
        stem = self.path.name.split(".", 1)[0]
        return int(stem) if stem.isdigit() else 0

    def spans(self) -> Iterator[tuple[int, list[Spooled]]]:
        """(start offset, events) of each record: a start names the record in markers."""
        start = self.begin
        for end, events in self.records:
            yield start, events
            start = end


def read_segment(path: Path, start: int = 0, limit: int | None = None) -> Segment:
    """The good records of ``path`` from byte ``start`` (a record boundary); with ``limit``,
    stop once that many events are read. Offsets in the result are the file's."""
    begin = max(start, len(MAGIC))
    segment = Segment(path, begin=begin)
    with open(path, "rb") as file:
        head = file.read(len(MAGIC))
        file.seek(begin)
        data = file.read()
    if head not in _READABLE:
        segment.damage = (
            f"not an asynctrack spool segment of version {MAGIC[-1]} or older "
            f"(version byte {head[-1]})"
            if head[:7] == MAGIC[:7] and len(head) == len(MAGIC)
            else "not an asynctrack spool segment"
        )
        segment.lost_bytes = len(head) + len(data)
        return segment
    pos, events_read = 0, 0
    while pos < len(data) and (limit is None or events_read < limit):
        at = begin + pos
        if pos + _HEADER.size > len(data):
            segment.damage = f"torn record header at byte {at}, the end"
            break
        length, crc = _HEADER.unpack_from(data, pos)
        body = pos + _HEADER.size
        if length > _MAX_RECORD or body + length > len(data):
            segment.damage = f"record at byte {at} runs past the end (torn write)"
            break
        payload = data[body : body + length]
        if zlib.crc32(payload) != crc:
            segment.damage = f"checksum mismatch in the record at byte {at}"
            break
        try:
            events = decode(payload)
        except (ValueError, TypeError, IndexError, EOFError) as exc:
            segment.damage = f"unreadable record at byte {at}: {exc}"
            break
        pos = body + length
        events_read += len(events)
        segment.records.append((begin + pos, events))
    segment.lost_bytes = len(data) - pos if segment.damage else 0
    return segment


@dataclass
class SpoolDir:
    """One writer's directory as found on disk."""

    directory: Path
    owner: dict[str, Any]
    alive: bool  # its writer still holds the lock
    segments: list[Path]

    @property
    def size(self) -> int:
        return sum(_size(p) for p in self.segments)


def _size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0


def scan(root: Path) -> list[SpoolDir]:
    """Every writer directory under ``root``, oldest first."""
    found: list[SpoolDir] = []
    if not root.is_dir():
        return found
    for directory in root.iterdir():
        if not directory.is_dir() or not (directory / "lock").exists():
            continue
        try:
            owner = json.loads((directory / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {}
        found.append(
            SpoolDir(directory, owner, not _lock_free(directory), sorted(directory.glob("*.seg")))
        )
    return sorted(found, key=_started)


def _started(found: SpoolDir) -> tuple[float, str]:
    value = found.owner.get("started")
    return (float(value) if isinstance(value, (int, float)) else 0.0, found.directory.name)


def _lock_free(directory: Path) -> bool:
    with claim(directory) as fd:
        return fd is not None


@contextlib.contextmanager
def claim(directory: Path) -> Iterator[int | None]:
    """Hold ``directory``'s lock (yield its fd) or yield None when someone else holds it:
    its writer, alive, or another ``asynctrack sync``."""
    try:
        fd = os.open(directory / "lock", os.O_RDWR)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)
