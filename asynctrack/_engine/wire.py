"""A lean HTTP/1.1 client for the batches, with kept-alive connections, one per sender thread.

MLflow's ``http_request`` costs about 3 ms of CPU per call before any byte is sent: it
resolves request-header plugins (each probing for Databricks and Spark imports that fail),
reads proxy settings from the environment and merges session settings. At 10 calls a second
that is 3% of a core taken from the training loop, which shares the GIL with our worker.
Here all of that is done once, when the transport is built; a call is about 0.6 ms.

Only plain set-ups take this path: ``http(s)`` with no auth, basic auth (from MLflow's
variables or credentials file, the URL's ``user:password@`` or netrc) or a bearer token,
optional CA bundle and client certificate, and no proxy for the server. Anything else (auth
plugins, AWS SigV4, Databricks, a proxy) goes through MLflow's ``http_request`` unchanged:
:func:`routed_reason` says why.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import http.client
import math
import os
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit


def routed_reason(creds: Any) -> str | None:
    """Why requests with ``creds`` (MLflow's host credentials) must go through MLflow's
    ``http_request`` (something is computed per request), or None when the wire serves them."""
    from requests.utils import get_environ_proxies

    if creds.auth:
        return f"request-auth plugin MLFLOW_TRACKING_AUTH={creds.auth}"
    if creds.aws_sigv4:
        return "AWS SigV4 signing (MLFLOW_TRACKING_AWS_SIGV4)"
    databricks = (creds.use_databricks_sdk, creds.client_secret, creds.workspace_id)
    if any(databricks) or os.environ.get("_MLFLOW_DATABRICKS_TRAFFIC_ID"):
        return "Databricks authentication"
    if urlsplit(creds.host).scheme not in ("http", "https"):
        return f"the {urlsplit(creds.host).scheme!r} scheme"
    if get_environ_proxies(creds.host):
        return "a proxy for the server (HTTP_PROXY, HTTPS_PROXY or ALL_PROXY)"
    return None


def usable(creds: Any) -> bool:
    """Whether ``creds`` (MLflow's host credentials) need nothing computed per request."""
    return routed_reason(creds) is None


def resolve_auth(creds: Any) -> str | None:
    """The ``Authorization`` header MLflow's ``http_request`` sends with ``creds``, or None.

    MLflow puts its own header on the request (username and password from its variables or
    ``~/.mlflow/credentials``, else the token), then ``requests`` replaces it, in this
    order: a netrc entry for the host (``NETRC`` or ``~/.netrc``), else the URL's
    ``user:password@``. The files are read again at every call, as ``requests`` reads them
    at every request.
    """
    from requests.utils import get_auth_from_url, get_netrc_auth

    netrc = get_netrc_auth(creds.host)
    if netrc is not None:
        return _requests_basic(*netrc)
    in_url = get_auth_from_url(creds.host)
    if any(in_url):
        return _requests_basic(*in_url)
    if creds.username and creds.password:
        pair = f"{creds.username}:{creds.password}".encode()
        return "Basic " + base64.standard_b64encode(pair).decode()
    if creds.token:
        return f"Bearer {creds.token}"
    return None


def _requests_basic(username: str, password: str) -> str:
    """Basic auth as ``requests`` encodes it (latin-1, unlike MLflow's own UTF-8)."""
    from requests import PreparedRequest
    from requests.auth import HTTPBasicAuth

    request = PreparedRequest()
    request.prepare_headers({})
    value = HTTPBasicAuth(username, password)(request).headers["Authorization"]
    return value if isinstance(value, str) else value.decode("latin-1")


class Wire:
    """POSTs to one tracking server; safe to call from several threads at once."""

    def __init__(self, creds: Any, timeout: float) -> None:
        from mlflow.tracking.request_header.registry import resolve_request_headers
        from mlflow.utils.rest_utils import _should_include_workspace_header
        from mlflow.utils.workspace_context import get_request_workspace
        from mlflow.utils.workspace_utils import WORKSPACE_HEADER_NAME

        url = urlsplit(creds.host)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port
        self._prefix = url.path.rstrip("/")
        self._timeout = timeout
        self._ssl = _ssl_context(creds) if self._https else None
        self._base = {**resolve_request_headers(), "Content-Type": "application/json"}
        self._headers = self._base
        self.refresh(creds)
        workspace = get_request_workspace()
        self._workspace = (
            {WORKSPACE_HEADER_NAME: workspace}
            if workspace and _should_include_workspace_header("/api/2.0/mlflow/runs")
            else {}
        )
        self._local = threading.local()

    def refresh(self, creds: Any) -> None:
        """Use the credentials ``creds`` resolve to from the next request on (a rotated
        password, token or netrc file); cheap: no header plugin runs again. Safe while
        other threads send."""
        auth = resolve_auth(creds)
        # A header plugin's Authorization stays unless credentials replace it, as in MLflow.
        # One reference swapped: a request reads either the old headers or the new ones.
        self._headers = self._base if auth is None else {**self._base, "Authorization": auth}

    def __repr__(self) -> str:  # the headers hold credentials: never show them
        scheme = "https" if self._https else "http"
        return f"Wire({scheme}://{self._host}:{self._port})"

    def post(self, endpoint: str, body: bytes) -> tuple[int, str]:
        """Send one request; return the status and the response text.

        A kept-alive connection the server closed while idle fails on first use; that one
        request is sent again on a fresh connection. MLflow ignores a metric, param or tag
        stored twice, so a resend after an unlucky race cannot duplicate anything.
        """
        response, data = self._exchange(endpoint, body)
        return response.status, data.decode("utf-8", "replace")

    def post_full(
        self, endpoint: str, body: bytes, timeout: float | None = None
    ) -> tuple[int, str, float | None]:
        """As :meth:`post`, plus the seconds the server's ``Retry-After`` asks to wait;
        ``timeout`` replaces the configured one for this request."""
        response, data = self._exchange(endpoint, body, timeout)
        retry_after = parse_retry_after(response.getheader("Retry-After"), time.time())
        return response.status, data.decode("utf-8", "replace"), retry_after

    def _exchange(
        self, endpoint: str, body: bytes, timeout: float | None = None
    ) -> tuple[http.client.HTTPResponse, bytes]:
        headers = {**self._headers, **self._workspace, "Content-Length": str(len(body))}
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        for reused in (conn is not None, False):
            if conn is None:
                conn = self._connect()
            wait = self._timeout if timeout is None else timeout
            if conn.timeout != wait:  # a kept-alive connection: its socket exists already
                conn.timeout = wait
                if conn.sock is not None:
                    conn.sock.settimeout(wait)
            try:
                conn.request("POST", self._prefix + endpoint, body, headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = self._local.conn = None
                if reused and not isinstance(exc, TimeoutError):
                    continue
                raise
            if response.will_close:
                conn.close()
                conn = None
            self._local.conn = conn
            return response, data
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        if self._ssl is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._ssl
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date (compared
    with ``now``, seconds since the epoch). None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    with contextlib.suppress(ValueError):
        seconds = float(value)  # RFC 9110 says whole seconds; some servers send fractions
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


def _ssl_context(creds: Any) -> ssl.SSLContext:
    """TLS as ``requests`` would set it up for MLflow: CA bundle, insecure flag, client cert."""
    verify = creds.verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        import certifi

        bundle = (
            verify
            if isinstance(verify, str)
            else os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or certifi.where()
        )
        # requests takes a directory of hashed certificates as well as a file
        if os.path.isdir(bundle):
            context = ssl.create_default_context(capath=bundle)
        else:
            context = ssl.create_default_context(cafile=bundle)
    if creds.client_cert_path:
        context.load_cert_chain(creds.client_cert_path)
    return context
