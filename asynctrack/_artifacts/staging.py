"""Staging: what a call logs is copied at the call and kept until it is stored.

A training loop may overwrite ``residuals.png`` every epoch, so the bytes stored must be the
bytes at the moment of ``log_artifact``: the call copies the file into a staging area and
the upload reads the copy. ``shutil.copyfile`` copies in the kernel (``sendfile`` on
Linux), so no Python buffer holds the file; a hard link would be cheaper but shares the
inode that an in-place rewrite changes. Each call gets its own area laid out as the files'
run-relative paths (``<area>/<artifact path>``), so MLflow's repositories, which name the
stored file after the local one, store it under the right name.

Areas live beside the spool record that names them, in ``<spool directory>/staged/``:
batch systems wipe the temporary directory when a job ends, and what the spool keeps for
``asynctrack sync`` must outlive the process. ``staging_dir``, when set, is used instead
(``<staging dir>/asynctrack-<pid>-*/<engine>/``); without a spool, the system's temporary
directory. A staged copy is removed once its upload is done: stored, or refused for good
(see :mod:`asynctrack._artifacts.upload`); what the exit deadline cut short stays for
``sync``, unless there is no spool to name it (then it goes when the worker stops).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from asynctrack._engine.spool import STAGED

if TYPE_CHECKING:
    from asynctrack._engine.jobs import JobContext, Resources
    from asynctrack.config import EngineConfig

_lock = threading.Lock()
_roots: dict[str, tuple[int, Path]] = {}  # base directory -> (pid, this process's folder)
_areas = itertools.count()


class Stager(Protocol):
    """What staging needs of an engine."""

    config: EngineConfig
    resources: Resources

    def start(self) -> None: ...

    def spool_dir(self) -> str: ...


@dataclass(frozen=True)
class StagedFile:
    """A captured file: its staged copy, its run-relative destination and where it came
    from (for messages)."""

    path: str
    dest: str
    source: str
    size: int


def engine_dir(engine: Stager) -> Path:
    """Where ``engine``'s calls stage their files (chosen at the first call)."""
    directory = engine.resources.staging
    if directory is None:
        engine.start()  # the worker opens the spool
        spool_dir, configured = engine.spool_dir(), engine.config.staging_dir
        if spool_dir and not configured:
            directory = Path(spool_dir) / STAGED
        else:
            directory = _process_dir(configured or tempfile.gettempdir()) / f"engine-{id(engine):x}"
        engine.resources.staging = directory
    return directory


def _process_dir(base: str) -> Path:
    """This process's folder under ``base`` (a forked child gets its own)."""
    pid = os.getpid()
    with _lock:
        known = _roots.get(base)
        if known is None or known[0] != pid:
            os.makedirs(base, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"asynctrack-{pid}-", dir=base))
            known = _roots[base] = (pid, folder)
        return known[1]


def new_area(engine: Stager) -> Path:
    """A fresh, empty directory for one call's files."""
    area = engine_dir(engine) / str(next(_areas))
    area.mkdir(parents=True)
    return area


def remove(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def release(jobs: JobContext) -> None:
    """When ``jobs``' worker stops with nothing left in its spool: remove its staging
    directory, and this process's folder once no engine uses it."""
    directory = jobs.resources.staging
    if directory is None:
        return
    remove(directory)
    try:
        directory.parent.rmdir()
    except OSError:
        return  # another engine still stages there (or it is the spool's, still in use)


def stage_file(area: Path, source: str, dest: str) -> StagedFile:
    """Copy ``source`` to ``<area>/<dest>``."""
    target = area / dest
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return StagedFile(str(target), dest, source, target.stat().st_size)


def stage_tree(area: Path, source_dir: str, dest_dir: str) -> list[StagedFile]:
    """Copy every file under ``source_dir`` (subfolders included, symlinked folders not
    followed, as MLflow's ``log_artifacts`` walks) to ``<area>/<dest_dir>/...``."""
    staged: list[StagedFile] = []
    for folder, _dirs, names in os.walk(source_dir):
        rel = os.path.relpath(folder, source_dir)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        target_dir = area.joinpath(dest_dir, rel)
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            source = os.path.join(folder, name)
            target = target_dir / name
            shutil.copyfile(source, target)
            dest = "/".join(p for p in (dest_dir, rel, name) if p)
            staged.append(StagedFile(str(target), dest, source, target.stat().st_size))
    return staged


def staged_tree(root: Path) -> list[StagedFile]:
    """The files already in ``root`` (a model saved into the area), as staged files whose
    destinations are relative to ``root``."""
    staged: list[StagedFile] = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            dest = os.path.relpath(path, root).replace(os.sep, "/")
            staged.append(StagedFile(path, dest, path, os.path.getsize(path)))
    return staged
