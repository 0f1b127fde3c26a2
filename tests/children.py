"""A child Python process a test drives line by line (its run id, a go, its exit), for
scenarios that need a real process: a crash, an exit, a server taken away meanwhile."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator


class Child:
    """A child Python process running ``script``; its stdout lines are read by a thread so
    the test can wait for one with a deadline, and its stderr is collected."""

    def __init__(self, script: str, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def expect(self, word: str, timeout: float = 90) -> str:
        """The rest of the next stdout line starting with ``word`` (other lines skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"no {word!r} line from the child within {timeout} s; stderr:\n"
                    f"{self.stderr[-4000:]}"
                ) from None
            if line is None:
                self.proc.wait()
                raise AssertionError(
                    f"the child exited ({self.proc.returncode}) before printing {word!r}; "
                    f"stderr:\n{self.stderr[-4000:]}"
                )
            if line.split(" ", 1)[0] == word:
                return line[len(word) :].strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL: no exit hook, no flush, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._join()

    def wait(self, timeout: float) -> int:
        """The exit code; a child that does not exit within ``timeout`` fails the test."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the child did not exit within {timeout} s; stderr so far:\n{self.stderr[-4000:]}"
            ) from None
        self._join()
        return code

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(10)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


@contextlib.contextmanager
def child(script: str, args: list[str], env: dict[str, str]) -> Iterator[Child]:
    process = Child(script, args, env)
    try:
        yield process
    finally:
        process.cleanup()
