"""A lean HTTP/1.1 client for the batches, with kept-alive connections, one per sender thread.

MLflow's ``http_request`` costs about 3 ms of CPU per call before any byte is sent: it
resolves request-header plugins (each probing for Databricks and Spark imports that fail),
reads proxy settings from the environment and merges session settings. At 10 calls a second
that is 3% of a core taken from the training loop, which shares the GIL with our worker.
Here all of that is done once, when the transport is built; a call is about 0.6 ms.

Only plain set-ups take this path: ``http(s)`` with no auth, basic auth or a bearer token,
optional CA bundle and client certificate, and no proxy for the server. Anything else (auth
plugins, AWS SigV4, Databricks, a proxy) goes through MLflow's ``http_request`` unchanged.
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


def usable(creds: Any) -> bool:
    """Whether ``creds`` (MLflow's host credentials) need nothing computed per request."""
    from requests.utils import get_environ_proxies

    per_request = (
        creds.auth,
        creds.aws_sigv4,
        creds.use_databricks_sdk,
        creds.client_secret,
        creds.workspace_id,
        os.environ.get("_MLFLOW_DATABRICKS_TRAFFIC_ID"),
    )
    return (
        not any(per_request)
        and urlsplit(creds.host).scheme in ("http", "https")
        and not get_environ_proxies(creds.host)
    )


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
        headers = {**resolve_request_headers(), "Content-Type": "application/json"}
        if creds.username and creds.password:
            pair = f"{creds.username}:{creds.password}".encode()
            headers["Authorization"] = "Basic " + base64.standard_b64encode(pair).decode()
        elif creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        self._headers = headers
        workspace = get_request_workspace()
        self._workspace = (
            {WORKSPACE_HEADER_NAME: workspace}
            if workspace and _should_include_workspace_header("/api/2.0/mlflow/runs")
            else {}
        )
        self._local = threading.local()

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

        cafile = (
            verify
            if isinstance(verify, str)
            else os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or certifi.where()
        )
        context = ssl.create_default_context(cafile=cafile)
    if creds.client_cert_path:
        context.load_cert_chain(creds.client_cert_path)
    return context
