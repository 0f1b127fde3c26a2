"""What spool directories hold, read without sending anything: ``asynctrack status``, and
the survey a sync makes of a directory before replaying it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from asynctrack._engine import spool
from asynctrack._engine.events import MetaEvent, to_seconds


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
    mlflow_path: str | None = None  # why its requests took MLflow's own HTTP client


@dataclass
class Survey:
    """A directory read once before anything is sent."""

    paths: list[Path]
    events: int = 0  # what the server does not have: settled records and finished uploads left out
    runs: set[str] = field(default_factory=set)  # every run named, settled records too
    ended: set[str] = field(default_factory=set)
    oldest: float | None = None
    damage: list[str] = field(default_factory=list)
    mtimes: list[float] = field(default_factory=list)
    done: set[str] = field(default_factory=set)  # uploads their writer finished
    settled: set[tuple[int, int]] = field(default_factory=set)  # (segment, record start)


def survey(paths: list[Path], writing: bool = False) -> Survey:
    found = Survey(paths)
    # Markers may come after the records they name (in a later segment): count at the end.
    records: list[tuple[int, int, int, float | None]] = []  # segment, start, events, oldest
    uploads: list[str] = []
    for path in paths:
        try:
            found.mtimes.append(path.stat().st_mtime)
            segment = spool.read_segment(path)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):  # else a live writer just dropped it
                found.damage.append(f"{path.name}: cannot read: {exc.strerror or exc}")
            continue
        for start, events in segment.spans():
            count, oldest = 0, None
            for event in events:
                if type(event) is tuple:
                    count += 1
                    found.runs.add(event[0])
                    when = to_seconds(event[3])
                    if oldest is None or when < oldest:
                        oldest = when
                elif isinstance(event, spool.Settled):  # markers, not events
                    found.settled.update((event.segment, o) for o in event.offsets)
                elif isinstance(event, spool.ArtifactDone):
                    found.done.add(event.path)
                elif isinstance(event, (spool.Artifact, spool.Model)):  # settled by its own marker
                    found.runs.add(event.run_id)
                    uploads.append(event.path)
                else:
                    count += 1
                    found.runs.add(event.run_id)
                    if isinstance(event, MetaEvent) and event.kind == "end":
                        found.ended.add(event.run_id)
            if count:
                records.append((segment.number, start, count, oldest))
        # a live writer's last record may be half written: not damage
        if segment.damage and not (writing and path == paths[-1]):
            found.damage.append(f"{path.name}: {segment.damage} ({segment.lost_bytes} bytes lost)")
    for number, start, count, oldest in records:
        if (number, start) not in found.settled:
            found.events += count
            if oldest is not None and (found.oldest is None or oldest < found.oldest):
                found.oldest = oldest
    found.events += sum(1 for path in uploads if path not in found.done)
    return found


def writer_dirs(root: Path) -> list[spool.SpoolDir]:
    if (root / "lock").exists():  # one writer's directory, not the root
        return [d for d in spool.scan(root.parent) if d.directory.name == root.name]
    return spool.scan(root)


def status(root: Path) -> list[DirStatus]:
    """Every writer directory under ``root`` (or ``root`` itself) and what it holds."""
    result = []
    for d in writer_dirs(root):
        seen = survey(d.segments, writing=d.alive)
        since = seen.oldest if seen.oldest is not None else min(seen.mtimes, default=None)
        pid, routed = d.owner.get("pid"), d.owner.get("mlflow_path")
        result.append(
            DirStatus(d.directory, pid if isinstance(pid, int) else None,
                      str(d.owner.get("host", "?")), d.alive, len(d.segments), d.size,
                      seen.events, sorted(seen.runs), since, seen.damage,
                      routed if isinstance(routed, str) else None)
        )  # fmt: skip
    return result
