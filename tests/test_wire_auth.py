"""The wire's credentials and TLS, differential against MLflow's own ``http_request``.

For every mix of credential sources (MLflow's variables, its credentials file, a token,
the URL's ``user:password@``, netrc) and every TLS setting (CA bundle, insecure, client
certificate), a loopback server records what MLflow's ``http_request`` (through
``requests``) sends and what the wire sends; they must be the same. TLS uses a CA and
certificates made by ``trustme``.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from asynctrack._engine import wire

SECRET = "pw-ÿ-not-to-be-shown"  # latin-1 beyond ASCII: requests and MLflow encode it apart


class _Headers(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def _serve(context: ssl.SSLContext | None = None) -> Iterator[str]:
    _Headers.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Headers)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheme = "https" if context is not None else "http"
    yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def plain_server() -> Iterator[str]:
    yield from _serve()


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No credential anywhere: an empty HOME (netrc, ~/.mlflow/credentials); returns HOME."""
    for name in (
        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_INSECURE_TLS", "NETRC",
        "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
        "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _both_send(uri: str) -> tuple[str | None, str | None]:
    """The Authorization header MLflow's http_request sends, and the wire's."""
    creds = get_default_host_creds(uri)
    http_request(creds, "/x", "POST", max_retries=0, data=b"{}")
    wire.Wire(creds, 5.0).post("/x", b"{}")
    mlflow_sent, ours = _Headers.seen[-2:]
    assert wire.resolve_auth(creds) == ours
    return mlflow_sent, ours


SOURCES = ["env", "file", "token", "url", "netrc"]


@pytest.mark.parametrize(
    "sources",
    [[], *[[s] for s in SOURCES], ["env", "token"], ["file", "env"], ["url", "env"],
     ["url", "token"], ["netrc", "url"], ["netrc", "env"], SOURCES],
    ids=lambda sources: "+".join(sources) or "none",
)  # fmt: skip
def test_the_wire_sends_what_mlflow_sends(
    plain_server: str,
    no_credentials: Path,
    monkeypatch: pytest.MonkeyPatch,
    sources: list[str],
) -> None:
    uri = plain_server
    if "env" in sources:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "env-user")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", f"env-{SECRET}")
    if "file" in sources:  # what `mlflow login` writes
        (no_credentials / ".mlflow").mkdir()
        (no_credentials / ".mlflow" / "credentials").write_text(
            f"[mlflow]\nmlflow_tracking_username = file-user\n"
            f"mlflow_tracking_password = file-{SECRET}\n"
        )
    if "token" in sources:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    if "url" in sources:
        uri = uri.replace("//", "//url-user:url-pw%40x@")  # percent-encoded: '@'
    if "netrc" in sources:
        netrc = no_credentials / "netrc-file"
        netrc.write_text(f"machine 127.0.0.1 login netrc-user password netrc-{SECRET}\n")
        monkeypatch.setenv("NETRC", str(netrc))

    mlflow_sent, ours = _both_send(uri)

    assert ours == mlflow_sent
    assert (ours is None) == (sources == [])


def test_a_netrc_default_entry_counts_and_a_broken_netrc_is_skipped(
    plain_server: str, no_credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = no_credentials / ".netrc"  # the default place, found through HOME
    netrc.write_text("default login anyone password any-pw\n")
    assert _both_send(plain_server)[1] == "Basic " + base64.b64encode(b"anyone:any-pw").decode()
    netrc.write_text("machine\n")  # unreadable: requests goes on without it
    assert _both_send(plain_server) == (None, None)


# ---------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("tls")
    files = {"ca": where / "ca.pem", "client": where / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client = ca.issue_cert("asynctrack-client")
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    return files


@pytest.fixture(params=[False, True], ids=["server-cert", "client-cert-required"])
def tls_server(request: pytest.FixtureRequest, ca: trustme.CA) -> Iterator[tuple[str, bool]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if request.param:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    for url in _serve(context):
        yield url, request.param


def _outcome(send: Any) -> str:
    try:
        send()
    except Exception as exc:  # MLflow wraps requests' errors; the wire raises ssl's own
        if isinstance(exc, (OSError, http.client.HTTPException)) or "SSL" in str(exc):
            return "refused"
        raise
    return "ok"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # requests'
@pytest.mark.parametrize(
    "setting",
    ["none", "server-cert-path", "insecure", "requests-ca-bundle", "client-cert", "all-but-ca"],
)
def test_tls_settings_behave_as_in_mlflow(
    tls_server: tuple[str, bool],
    pems: dict[str, Path],
    no_credentials: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
) -> None:
    url, wants_client_cert = tls_server
    settings: dict[str, dict[str, object]] = {
        "none": {},
        "server-cert-path": {"MLFLOW_TRACKING_SERVER_CERT_PATH": pems["ca"]},
        "insecure": {"MLFLOW_TRACKING_INSECURE_TLS": "true"},
        "requests-ca-bundle": {"REQUESTS_CA_BUNDLE": pems["ca"]},
        "client-cert": {
            "MLFLOW_TRACKING_SERVER_CERT_PATH": pems["ca"],
            "MLFLOW_TRACKING_CLIENT_CERT_PATH": pems["client"],
        },
        "all-but-ca": {
            "MLFLOW_TRACKING_INSECURE_TLS": "true",
            "MLFLOW_TRACKING_CLIENT_CERT_PATH": pems["client"],
        },
    }
    for name, value in settings[setting].items():
        monkeypatch.setenv(name, str(value))
    creds = get_default_host_creds(url)

    theirs = _outcome(lambda: http_request(creds, "/x", "POST", max_retries=0, data=b"{}"))
    ours = _outcome(lambda: wire.Wire(creds, 5.0).post("/x", b"{}"))

    assert ours == theirs
    trusted = setting != "none"
    presented = "client-cert" in setting or setting == "all-but-ca"
    assert (ours == "ok") == (trusted and (presented or not wants_client_cert))
