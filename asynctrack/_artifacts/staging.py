"""Staging: what a call logs is copied at the call and kept until it is stored.

A training loop may overwrite ``residuals.png`` every epoch, so the bytes stored must be the
bytes at the moment of ``log_artifact``: the call copies the file into a per-process staging
directory and the upload reads the copy. ``shutil.copyfile`` copies in the kernel
(``sendfile`` on Linux), so no Python buffer holds the file; a hard link would be cheaper
but shares the inode that an in-place rewrite changes. Each call gets its own area laid out
as the files' run-relative paths (``<area>/<artifact path>``), so MLflow's repositories,
which name the stored file after the local one, store it under the right name.

Areas live under ``<staging dir>/asynctrack-<pid>-*/<engine>/``: a forked child stages
into its own directory, and when an engine's worker stops the engine's leftovers (uploads
the exit deadline cut short) are removed with it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asynctrack._engine.jobs import JobContext

_lock = threading.Lock()
_root: tuple[int, Path] | None = None  # (pid, directory)
_areas = itertools.count()


@dataclass(frozen=True)
class StagedFile:
    """A captured file: its staged copy, its run-relative destination and where it came
    from (for messages)."""

    path: str
    dest: str
    source: str
    size: int


def engine_dir(engine: JobContext) -> Path:
    """This process's staging directory for ``engine``'s uploads."""
    global _root
    pid = os.getpid()
    with _lock:
        if _root is None or _root[0] != pid:
            base = engine.config.staging_dir or tempfile.gettempdir()
            os.makedirs(base, exist_ok=True)
            _root = (pid, Path(tempfile.mkdtemp(prefix=f"asynctrack-{pid}-", dir=base)))
        root = _root[1]
    return root / f"engine-{id(engine):x}"


def new_area(engine: JobContext) -> Path:
    """A fresh, empty directory for one call's files."""
    area = engine_dir(engine) / str(next(_areas))
    area.mkdir(parents=True)
    return area


def remove(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def release(engine: JobContext) -> None:
    """When ``engine``'s worker stops: remove its leftovers, and this process's staging
    directory once no engine uses it."""
    directory = engine_dir(engine)
    remove(directory)
    try:
        directory.parent.rmdir()
    except OSError:
        return  # another engine still stages there


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
