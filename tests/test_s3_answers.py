"""S3's answers to an upload, sorted in one place (``asynctrack._artifacts.s3.sort_error``):
retried (away or busy), held (credentials or a permission: kept until fixed) or refused
(the data itself, or where it goes: final)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from asynctrack._artifacts.s3 import S3Settings, sort_error
from asynctrack._engine.transport import Held, Refused, Transient

SETTINGS = S3Settings(
    endpoint_url="http://127.0.0.1:9000",
    access_key="AKIAEXAMPLEEXAMPLE00",
    secret_key="s3cret-key",
    session_token=None,
    region=None,
    verify=True,
    addressing_style="auto",
    signature_version="s3v4",
    extra_args="{}",
)


def answer(code: str, status: int, message: str = "no") -> ClientError:
    error = {"Code": code, "Message": message}
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "Put")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("AccessDenied", 403),
        ("InvalidAccessKeyId", 403),
        ("SignatureDoesNotMatch", 403),
        ("ExpiredToken", 400),
        ("RequestTimeTooSkewed", 403),
    ],
)
def test_refused_credentials_or_permissions_are_held(code: str, status: int) -> None:
    held = sort_error(answer(code, status), SETTINGS)
    assert isinstance(held, Held) and f"{code} ({status})" in held.reason


@pytest.mark.parametrize(
    "error",
    [
        answer("InternalError", 500),
        answer("SlowDown", 503),
        answer("RequestTimeout", 400),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9000"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("read timed out"),
    ],
    ids=["500", "SlowDown", "RequestTimeout", "endpoint", "refused", "timeout"],
)
def test_away_or_busy_is_transient(error: Exception) -> None:
    assert isinstance(sort_error(error, SETTINGS), Transient)


def test_no_credentials_at_all_are_held() -> None:
    assert isinstance(sort_error(NoCredentialsError(), SETTINGS), Held)


@pytest.mark.parametrize(
    ("code", "status"),
    [("NoSuchBucket", 404), ("EntityTooLarge", 400), ("KeyTooLongError", 400)],
)
def test_other_answers_are_refused_for_good(code: str, status: int) -> None:
    refused = sort_error(answer(code, status), SETTINGS)
    assert isinstance(refused, Refused) and not refused.splittable


def test_reasons_never_show_the_credentials() -> None:
    message = "The key AKIAEXAMPLEEXAMPLE00 signed with s3cret-key does not exist"
    reason = str(sort_error(answer("InvalidAccessKeyId", 403, message), SETTINGS))
    assert "AKIAEXAMPLEEXAMPLE00" not in reason and "s3cret-key" not in reason
