"""Servers started by asynctrack.testing die with the process that started them, even when
that process is killed with SIGKILL (nothing of it runs: no atexit, no fixture teardown)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from faults import wait_until

# Starts a server from a short-lived thread (as tests/artifact_servers.py does), prints its
# URL and process group, then waits to be killed.
_STARTER = """
import sys, threading
from asynctrack.testing import MlflowServer
server = MlflowServer(sys.argv[1])
t = threading.Thread(target=server.start)
t.start(); t.join()
print(server.url, server.pid, flush=True)
sys.stdin.read()
"""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_server_dies_with_a_killed_starter(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert starter.stdout is not None
    url, pgid = starter.stdout.readline().split()
    # The thread that started it has ended: the server must outlive it.
    assert _answers(url)
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    wait_until(lambda: not _group_alive(int(pgid)), timeout=30, what="server group gone")
    assert not _answers(url)
