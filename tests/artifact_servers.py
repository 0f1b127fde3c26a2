"""Servers for the artifact and model tests: S3 with real credential checks, and MLflow
servers in direct and proxied artifact modes.

S3 is moto's server in a subprocess with IAM authentication switched on, so wrong
credentials and refused uploads fail as they do on MinIO: one IAM user may do anything in
S3 except write under ``*/forbidden/*``. It runs apart from the in-process moto of
``asynctrack.testing`` (whose buckets and auth switch are global to the test process).

moto checks signatures of requests whose query holds a ``/`` (a listing's prefix) against
a query it forgot to encode, and refuses them (getmoto/moto#5948); the server runs with a
small patch that encodes it first.

Test modules load this file as a plugin, so its session fixtures start once per test
session however many modules use them (fixtures imported into two modules would be two
fixtures, and start everything twice)::

    pytest_plugins = ["artifact_servers"]
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asynctrack.testing import MlflowServer, free_port

DIRECT_BUCKET = "asynctrack-direct"
PROXIED_BUCKET = "asynctrack-proxied"
REGION = "us-east-1"
_HOST = "127.0.0.1"
_DENY_FORBIDDEN = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::*/forbidden/*"},
    ],
}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_MOTO_WITH_QUERY_FIX = """
import sys, urllib.parse
from moto.iam import access_control

original = access_control.IAMRequestBase.__init__

def __init__(self, account_id, method, path, *args, **kwargs):
    base, _, query = path.partition("?")
    if query:
        quote = lambda s: urllib.parse.quote(s, safe="-_.~")
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        path = base + "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs)
    original(self, account_id, method, path, *args, **kwargs)

access_control.IAMRequestBase.__init__ = __init__
from moto.server import main
sys.exit(main(sys.argv[1:]))
"""


class IamS3Server:
    """``python -m moto.server`` with IAM auth on, one user and the given buckets."""

    def __init__(self, workdir: Path, buckets: tuple[str, ...]) -> None:
        self.workdir = workdir
        self.buckets = buckets
        self.port = free_port()
        self.endpoint_url = f"http://{_HOST}:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self.access_key = self.secret_key = ""

    def start(self) -> None:
        log = (self.workdir / "moto.log").open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_WITH_QUERY_FIX, "-H", _HOST, "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() signals its whole group
        )
        deadline = time.monotonic() + 60
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not start; see {self.workdir / 'moto.log'}")
            time.sleep(0.1)
        self._provision()

    def _answers(self) -> bool:
        try:
            with _NO_PROXY.open(f"{self.endpoint_url}/moto-api/", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def _provision(self) -> None:
        """With auth still off: the user, its key and policy, the buckets; then auth on."""
        iam = self._boto("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="asynctrack")
        key = iam.create_access_key(UserName="asynctrack")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        iam.put_user_policy(
            UserName="asynctrack", PolicyName="s3", PolicyDocument=json.dumps(_DENY_FORBIDDEN)
        )
        s3 = self._boto("s3", "bootstrap", "bootstrap")
        for bucket in self.buckets:
            s3.create_bucket(Bucket=bucket)
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=b"0",  # unauthenticated requests allowed from now on: none
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with _NO_PROXY.open(request, timeout=10):
            pass

    def _boto(self, service: str, key: str, secret: str) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name=REGION,
        )

    def client(self) -> Any:
        """A boto3 S3 client with the user's valid key."""
        return self._boto("s3", self.access_key, self.secret_key)

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class ArtifactMode:
    """One MLflow server and how its runs store artifacts."""

    name: str  # "direct" or "proxied"
    server: MlflowServer
    bucket: str

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session", name="s3")
def fixture_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamS3Server]:
    server = IamS3Server(tmp_path_factory.mktemp("moto"), (DIRECT_BUCKET, PROXIED_BUCKET))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", name="artifact_servers")
def fixture_artifact_servers(
    s3: IamS3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ArtifactMode]]:
    """A direct-mode and a proxied-mode MLflow server, started side by side."""
    direct = MlflowServer(
        tmp_path_factory.mktemp("mlflow-direct"),
        ["--default-artifact-root", f"s3://{DIRECT_BUCKET}/", "--no-serve-artifacts"],
        env=s3.env(),
    )
    proxied = MlflowServer(
        tmp_path_factory.mktemp("mlflow-proxied"),
        ["--serve-artifacts", "--artifacts-destination", f"s3://{PROXIED_BUCKET}"],
        env=s3.env(),
    )
    servers = (direct, proxied)
    errors: list[BaseException] = []

    def start(server: MlflowServer) -> None:
        try:
            server.start()
        except BaseException as exc:  # re-raised below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if errors:
            raise errors[0]
        yield {
            "direct": ArtifactMode("direct", direct, DIRECT_BUCKET),
            "proxied": ArtifactMode("proxied", proxied, PROXIED_BUCKET),
        }
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(name="s3_env")
def fixture_s3_env(s3: IamS3Server, monkeypatch: pytest.MonkeyPatch) -> IamS3Server:
    """Point this test's S3 clients (asynctrack's and MLflow's) at the moto server."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    # A proxied server offers presigned URLs for downloads; moto's IAM check refuses their
    # query-string signatures, so MLflow's client would retry for minutes. Read through the
    # server instead.
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    return s3


@pytest.fixture(params=["direct", "proxied"], name="artifact_mode")
def fixture_artifact_mode(
    request: pytest.FixtureRequest,
    artifact_servers: dict[str, ArtifactMode],
    s3_env: IamS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> ArtifactMode:
    mode = artifact_servers[request.param]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mode.url)
    return mode


@pytest.fixture(name="direct_mode")
def fixture_direct_mode(
    artifact_servers: dict[str, ArtifactMode], s3_env: IamS3Server, monkeypatch: pytest.MonkeyPatch
) -> ArtifactMode:
    mode = artifact_servers["direct"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mode.url)
    return mode
