"""Every ```python block of README.md and docs/*.md runs, as pasted, against the test servers.

The convention, for whoever writes docs:

- Each ```python block is a test of its own (id ``<file>:<line>``). It runs in a fresh
  ``python`` process, in an empty temporary directory, with ``MLFLOW_TRACKING_URI``
  pointing at the suite's MLflow server (``mlflow_server`` from asynctrack.testing) and
  the S3 variables (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``) pointing at its moto S3 server.
  So a block must be whole: its imports, its data, and a call of what it defines
  (``asyncio.run(main())`` for async code).
- A block that cannot run here (it needs torch, a GPU, docker, a shared server) is skipped
  by an HTML comment on the line just before its opening fence, with the reason::

      <!-- snippet: skip (needs torch) -->
      ```python
      ...

  The reason shows in pytest's summary. Blocks in other languages (```bash, ```text) are
  never run.
- A block that takes tens of seconds (it starts a server, logs a model) is marked
  ``<!-- snippet: slow -->`` the same way: it runs, but not under ``pytest -m "not slow"``.
- A block passes when it exits 0 within the timeout below; it prints what it likes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from asynctrack.testing import MlflowServer, S3Server

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*snippet:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
SLOW = re.compile(r"<!--\s*snippet:\s*slow\s*-->")
TIMEOUT = 180


class Snippet(NamedTuple):
    where: str
    code: str
    skip: str | None
    slow: bool


def snippets(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file, with the line of their opening fence."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```+\s*python\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        indent, start = fence.group(1), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i].removeprefix(indent))
            i += 1
        before = lines[start - 1] if start else ""
        mark = SKIP.search(before)
        skip = (mark.group("reason") or "marked skip") if mark else None
        where = f"{path.relative_to(REPO)}:{start + 1}"
        found.append(Snippet(where, "\n".join(body), skip, bool(SLOW.search(before))))
        i += 1
    return found


ALL = [s for doc in DOCUMENTS for s in snippets(doc)]


def test_the_docs_have_snippets() -> None:
    assert any(s.where.startswith("README.md") for s in ALL)
    assert len(ALL) >= 5


@pytest.mark.parametrize(
    "snippet",
    [pytest.param(s, id=s.where, marks=[pytest.mark.slow] if s.slow else []) for s in ALL],
)
def test_snippet_runs(
    snippet: Snippet, mlflow_server: MlflowServer, s3_server: S3Server, tmp_path: Path
) -> None:
    if snippet.skip:
        pytest.skip(f"{snippet.where}: {snippet.skip}")
    env = {
        **os.environ,
        **s3_server.env(),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MPLBACKEND": "Agg",
    }
    done = subprocess.run(
        [sys.executable, "-c", snippet.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{snippet.where} failed:\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
