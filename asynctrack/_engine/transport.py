"""How batches reach the tracking store, and how its answers are sorted.

Two transports with one contract: ``log_batch``, ``end_run``, ``run_status`` and
``run_tags`` either return, raise :class:`Transient` (retry later: the server is down,
overloaded or slow), raise :class:`Held` (the server refused the credentials or a
permission: the user can fix that, so what was sent is kept, never dropped) or raise
:class:`Refused` (the server said no to the data itself; retrying cannot help). Only a
refusal lets events leave the spool unstored.
:func:`check_answer` and :func:`sort_mlflow_error` are the one place where an answer is
judged, for the live worker, ``asynctrack sync`` and the artifact uploads alike.

``RestTransport`` writes the ``log-batch`` JSON body directly: building MLflow entities and
protobufs costs about 14 us of worker CPU per metric, the body written here under 1 us,
and the worker shares the GIL with the training loop. It is sent by ``wire.Wire``, or by
MLflow's own ``http_request`` when authentication or proxies need it per request.
``StoreTransport`` serves every other tracking URI (``file:``, ``sqlite:``...) through
MLflow's own, unpatched client (:func:`asynctrack._gate.plain_client`).
"""

from __future__ import annotations

import http.client
import json
import math
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from asynctrack._engine.events import INT64_MAX, INT64_MIN, Metric, to_json_number, to_ms
from asynctrack._engine.limiter import Limiter, Outcome
from asynctrack._engine.wire import Wire, routed_reason

KeyValue = tuple[str, str]

# Server answers that mean "try again later".
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# MlflowException codes meaning "away or busy" (a local store, or MLflow's own client).
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED"})
# An overloaded server answers some requests with a 400 whose message tells the truth:
# an exhausted SQLAlchemy pool (PostgreSQL) or a busy sqlite file.
_OVERLOAD_MESSAGES = ("QueuePool limit of size", "database is locked")
# Error codes where the request as a whole is refused, so splitting it cannot help.
_WHOLE_REQUEST_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"})
# Answers about who is asking, not about the data: a wrong or expired password or token,
# a missing permission, a proxy's login. Kept and retried, not refused.
HELD_STATUS = frozenset({401, 403, 407})
HELD_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


class Transient(Exception):
    """The request may succeed later (not before ``retry_after`` seconds, when given);
    ``outcome`` tells the limiter whether the server seems overloaded."""

    def __init__(
        self, reason: str, retry_after: float | None = None, outcome: Outcome = Outcome.ERROR
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.outcome = outcome


class Refused(Exception):
    """The server refused the request; ``splittable`` when single events may be at fault."""

    def __init__(self, reason: str, splittable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.splittable = splittable


class Held(Exception):
    """The server refused the credentials or a permission (HTTP 401, 403, 407): what was
    sent is kept and retried, with credentials resolved again, until they are fixed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Transport(Protocol):
    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric],
        params: Sequence[KeyValue],
        tags: Sequence[KeyValue],
    ) -> None: ...

    def end_run(self, run_id: str, status: str, end_time: int) -> None: ...

    def run_status(self, run_id: str) -> str: ...

    def run_tags(self, run_id: str) -> dict[str, str]: ...

    def refresh(self) -> None:
        """Resolve the credentials again (after a :class:`Held` answer): a rotated token
        or a changed password file is picked up without a restart."""


def outcome_of(status: int, text: str = "") -> Outcome:
    """What an HTTP answer (status and body) says about the server's load."""
    if status in TRANSIENT_STATUS or status >= 500:
        return Outcome.OVERLOAD
    if status == 400 and any(sign in text for sign in _OVERLOAD_MESSAGES):
        return Outcome.OVERLOAD  # MLflow's 400 for an exhausted pool: overload all the same
    return Outcome.OK


def check_answer(status: int, text: str, retry_after: float | None = None) -> None:
    """Return for a 200; raise Transient or Refused for any other answer."""
    if status == 200:
        return
    if outcome_of(status, text) is Outcome.OVERLOAD:
        detail = f": {short(_error_of(text)[1])}" if status == 400 else ""
        raise Transient(f"HTTP {status}{detail}", retry_after, Outcome.OVERLOAD)
    code, message = _error_of(text)
    if status in HELD_STATUS:
        raise Held(f"HTTP {status}: {short(message)}")
    raise Refused(
        f"{code or 'HTTP ' + str(status)}: {short(message)}",
        splittable=_splittable(code, message) and status != 404,
    )


def sort_mlflow_error(exc: Exception) -> Transient | Held | Refused:
    """An exception from MLflow's own client, store or artifact repository, as a
    Transient, Held or Refused."""
    from mlflow.exceptions import MlflowException

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and status != 200:
        # requests' HTTPError: an answer of the tracking server's artifact proxy, judged
        # as any answer of the server is
        try:
            check_answer(status, str(getattr(response, "text", "") or exc))
        except (Transient, Held, Refused) as answer:
            return answer
    if isinstance(exc, MlflowException):
        code, message = exc.error_code, exc.message
        if code in TRANSIENT_CODES or any(sign in message for sign in _OVERLOAD_MESSAGES):
            return Transient(short(message), None, Outcome.OVERLOAD)
        if code in HELD_CODES:
            return Held(f"{code}: {short(message)}")
        return Refused(f"{code}: {short(message)}", splittable=_splittable(code, message))
    if isinstance(exc, OSError):  # requests' connection errors, a locked or full disk
        return Transient(short(f"{type(exc).__name__}: {exc}"))
    # an artifact store's own error (S3 credentials, say): reported, not retried
    return Refused(short(f"{type(exc).__name__}: {exc}"), splittable=False)


# '{"key":"<key>","value":' for each key seen, so a metric costs one f-string.
_key_prefix: dict[str, str] = {}
_SLICE = 200  # metrics encoded between two yields of the GIL


def _prefix(key: str) -> str:
    prefix = '{"key":' + json.dumps(key) + ',"value":'
    if len(_key_prefix) < 100_000:
        _key_prefix[key] = prefix
    return prefix


def encode_log_batch(
    run_id: str,
    metrics: Sequence[Metric],
    params: Sequence[KeyValue],
    tags: Sequence[KeyValue],
) -> str:
    """The ``log-batch`` request body, as MLflow's REST API expects it."""
    prefixes, finite, low, high = _key_prefix, math.isfinite, INT64_MIN, INT64_MAX
    parts: list[str] = []
    for start in range(0, len(metrics), _SLICE):
        if start:
            time.sleep(0)  # let the training loop take the GIL between slices
        parts.extend(
            f"{prefixes.get(key) or _prefix(key)}"
            f"{repr(value) if type(value) is float and finite(value) else to_json_number(value)}"
            f',"timestamp":{int(when * 1000) if type(when) is float else _ms(key, when)}'
            f',"step":{step if low <= step <= high else _bad(key, step)}}}'
            for _, key, value, when, step in metrics[start : start + _SLICE]
        )
    body = [f'{{"run_id":{json.dumps(run_id)},"metrics":[{",".join(parts)}]']
    if params:
        body.append(f',"params":{json.dumps([{"key": k, "value": v} for k, v in params])}')
    if tags:
        body.append(f',"tags":{json.dumps([{"key": k, "value": v} for k, v in tags])}')
    body.append("}")
    return "".join(body)


def _ms(key: str, when: float | int) -> int:
    if type(when) is int and 0 <= when <= INT64_MAX:
        return when
    return _bad(key, when)


def _bad(key: str, number: object) -> int:
    # The server stores 0 for an int64 overflow and drops the rest of the request, silently:
    # never send one (the caller's checks make this a guard against old spools and bugs).
    raise ValueError(f"metric {key!r}: {number} is outside int64 ({INT64_MIN} to {INT64_MAX})")


class RestTransport:
    """An ``http(s)://`` tracking server, spoken to directly with pre-encoded JSON."""

    def __init__(self, tracking_uri: str, request_timeout: float) -> None:
        self._uri = tracking_uri
        self._timeout = request_timeout
        self._wire: Wire | None = None
        self._routed_count = 0  # requests sent through MLflow's path, from sender threads
        self._count_lock = threading.Lock()
        self.refresh()
        #: The engine's server limiter, which stretches the timeout while the server is slow.
        self.limiter: Limiter | None = None

    def refresh(self) -> None:
        """Read MLflow's credential sources again (its variables and credentials file, the
        URL's ``user:password@``, netrc): the next request uses a rotated password or token.
        Safe from any thread while requests are under way."""
        from mlflow.utils.credentials import get_default_host_creds

        creds = get_default_host_creds(self._uri)
        routed = routed_reason(creds)  # why MLflow's http_request must send (None: the wire)
        wire = self._wire
        if routed is None and wire is not None:
            wire.refresh(creds)  # keeps its connections and the header plugins' work
        else:
            wire = Wire(creds, self._timeout) if routed is None else None
        if routed is not None:
            _name_route_once(self._uri, routed)
        # sender threads read _wire once per request, then _creds only without a wire
        self._creds, self._wire, self.routed = creds, wire, routed

    def mlflow_path(self) -> dict[str, int]:
        """Requests sent through MLflow's ``http_request``, by the reason they had to be."""
        return {self.routed: self._routed_count} if self.routed and self._routed_count else {}

    def _post(self, endpoint: str, body: str) -> None:
        retry_after = None
        if self._wire is None:
            status, text = self._post_via_mlflow(endpoint, body)
        else:
            try:
                limiter = self.limiter
                timeout = None if limiter is None else limiter.request_timeout(self._timeout)
                status, text, retry_after = self._wire.post_full(
                    endpoint, body.encode("utf-8"), timeout
                )
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
                outcome = Outcome.TIMEOUT if isinstance(exc, TimeoutError) else Outcome.ERROR
                raise Transient(short(f"{type(exc).__name__}: {exc}"), None, outcome) from None
        check_answer(status, text, retry_after)

    def _post_via_mlflow(self, endpoint: str, body: str) -> tuple[int, str]:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.rest_utils import http_request

        with self._count_lock:
            self._routed_count += 1
        try:
            # max_retries=0: our worker retries with its own deadline, so a dead server
            # never holds a request (or the process's exit) for MLflow's two minutes.
            response = http_request(
                self._creds,
                endpoint,
                "POST",
                max_retries=0,
                backoff_factor=0,
                retry_codes=(),
                raise_on_status=False,
                timeout=self._timeout,
                data=body.encode("utf-8"),
                extra_headers={"Content-Type": "application/json"},
            )
        except MlflowException as exc:  # connection refused, reset, timed out
            raise Transient(short(str(exc))) from None
        return response.status_code, response.text

    def _get_run(self, run_id: str) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.rest_utils import http_request

        try:  # not MlflowClient.get_run: its retries take minutes against a dead server
            response = http_request(
                self._creds, "/api/2.0/mlflow/runs/get", "GET", max_retries=0,
                backoff_factor=0, retry_codes=(), raise_on_status=False,
                timeout=self._timeout, params={"run_id": run_id},
            )  # fmt: skip
        except MlflowException as exc:
            raise Transient(short(str(exc))) from None
        check_answer(response.status_code, response.text)
        run: dict[str, Any] = response.json()["run"]
        return run

    def run_status(self, run_id: str) -> str:
        return str(self._get_run(run_id)["info"]["status"])

    def run_tags(self, run_id: str) -> dict[str, str]:
        tags = self._get_run(run_id).get("data", {}).get("tags", [])
        return {str(t["key"]): str(t.get("value", "")) for t in tags}

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric],
        params: Sequence[KeyValue],
        tags: Sequence[KeyValue],
    ) -> None:
        self._post(
            "/api/2.0/mlflow/runs/log-batch", encode_log_batch(run_id, metrics, params, tags)
        )

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        body = json.dumps({"run_id": run_id, "status": status, "end_time": end_time})
        self._post("/api/2.0/mlflow/runs/update", body)


class StoreTransport:
    """Any other tracking URI (a local ``file:`` or ``sqlite:`` store), through MLflow's
    client as MLflow ships it: the drop-in's patched methods would queue these calls back
    into this engine."""

    def __init__(self, tracking_uri: str) -> None:
        from asynctrack._gate import plain_client

        self._client = plain_client(tracking_uri)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise sort_mlflow_error(exc) from None

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric],
        params: Sequence[KeyValue],
        tags: Sequence[KeyValue],
    ) -> None:
        from mlflow.entities import Metric as MetricEntity
        from mlflow.entities import Param, RunTag

        self._call(
            self._client.log_batch,
            run_id,
            metrics=[MetricEntity(m[1], float(m[2]), to_ms(m[3]), m[4]) for m in metrics],
            params=[Param(k, v) for k, v in params],
            tags=[RunTag(k, v) for k, v in tags],
            synchronous=True,
        )

    def end_run(self, run_id: str, status: str, end_time: int) -> None:
        self._call(self._client.set_terminated, run_id, status, end_time)

    def run_status(self, run_id: str) -> str:
        return str(self._call(self._client.get_run, run_id).info.status)

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self._call(self._client.get_run, run_id).data.tags)

    def refresh(self) -> None:
        """A local store asks for no credentials; a database URI carries its own."""


_named_routes: set[tuple[str, str]] = set()


def _name_route_once(tracking_uri: str, reason: str) -> None:
    """One line per server and reason per process: MLflow's path costs ~3 ms of CPU a call."""
    where = (redact(tracking_uri), reason)
    if where not in _named_routes:
        _named_routes.add(where)
        sys.stderr.write(
            f"asynctrack: requests to {where[0]} go through MLflow's own HTTP client "
            f"({reason}), about 3 ms of CPU each; counted in asynctrack.stats().mlflow_path\n"
        )


def make_transport(tracking_uri: str, request_timeout: float) -> Transport:
    if tracking_uri.startswith(("http://", "https://")):
        return RestTransport(tracking_uri, request_timeout)
    return StoreTransport(tracking_uri)


def _splittable(code: str, message: str) -> bool:
    """Whether single events may be at fault, so splitting the request can save the rest.

    A run that is not active (deleted) refuses every event with INVALID_PARAMETER_VALUE;
    splitting would cost two requests per event and stall every other run's events.
    """
    return code not in _WHOLE_REQUEST_CODES and "must be in the 'active' state" not in message


def _error_of(text: str) -> tuple[str, str]:
    try:
        payload = json.loads(text)
    except ValueError:
        return "", text
    if not isinstance(payload, dict):
        return "", text
    return str(payload.get("error_code", "")), str(payload.get("message", text))


_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")


def redact(text: str) -> str:
    """Hide the ``user:password@`` part of any URL in ``text``."""
    return _USERINFO.sub("***@", text)


def short(message: str, limit: int = 300) -> str:
    """Trim a server message, and hide credentials a URL in it carries."""
    message = redact(message)
    return message if len(message) <= limit else message[:limit] + "..."
