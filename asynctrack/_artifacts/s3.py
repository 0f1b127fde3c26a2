"""Direct uploads to S3 or MinIO through aiobotocore, on the engine's worker loop.

One client per endpoint and credentials lives as long as the worker (entered into its
``exit_stack``), so connections are reused across files and runs. Settings come from the
environment MLflow's own S3 store reads (``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``,
``MLFLOW_S3_IGNORE_TLS``, ``MLFLOW_S3_UPLOAD_EXTRA_ARGS``...), read when an upload starts,
with :mod:`asynctrack.config` as the fallback for the endpoint and credentials.

Every request (a whole small file, or one part of a large one) holds one of the engine's
``max_concurrent_uploads`` slots; bodies above 1 MiB are streamed from the staged copy a
chunk at a time, so memory stays within slots x 1 MiB whatever the file sizes; their
SHA-256 (signed, so the server checks it) is computed on the I/O threads, not the loop.
Botocore's own retries are off: transient failures (connection errors, timeouts, 5xx,
throttling) are retried here with backoff and jitter, counted and noted on the engine;
anything else is permanent and raised.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import mimetypes
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from asynctrack._artifacts.paths import join, split_s3_uri
from asynctrack._artifacts.staging import StagedFile
from asynctrack._engine.jobs import JobContext
from asynctrack._engine.retry import RetryPolicy
from asynctrack._engine.stats import FileCounters
from asynctrack._engine.transport import Held, Refused, Transient, redact

T = TypeVar("T")

_RETRY = RetryPolicy(first=0.25, maximum=8.0)  # the same as the batches'
_MAX_PARTS = 10_000  # S3's limit; larger files get larger parts
_CHUNK = 1024 * 1024  # bodies above this are streamed from disk in chunks of this size
_SIGNER = "asynctrack-s3v4"  # our signer's name in botocore's registry
# Error codes S3 and MinIO use for "try again later" (besides any 5xx status).
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "XMinioServerNotInitialized",
    }
)


@dataclass(frozen=True)
class S3Settings:
    """How to reach the S3 endpoint; also the key of the engine's client cache."""

    endpoint_url: str | None
    access_key: str | None = field(repr=False)
    secret_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False)
    region: str | None
    verify: bool
    addressing_style: str
    signature_version: str
    extra_args: str  # JSON, so the settings stay hashable

    @classmethod
    def from_env(cls) -> S3Settings:
        from asynctrack import config

        env = os.environ
        return cls(
            endpoint_url=env.get("MLFLOW_S3_ENDPOINT_URL") or config.MLFLOW_S3_ENDPOINT_URL or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or config.AWS_ACCESS_KEY_ID or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or config.AWS_SECRET_ACCESS_KEY or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            verify=env.get("MLFLOW_S3_IGNORE_TLS", "").lower() not in ("true", "1"),
            addressing_style=env.get("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE") or "auto",
            signature_version=env.get("MLFLOW_EXPERIMENTAL_S3_SIGNATURE_VERSION") or "s3v4",
            extra_args=json.dumps(_extra_args(env), sort_keys=True),
        )

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.access_key, self.secret_key, self.session_token) if s)


def _extra_args(env: os._Environ[str]) -> dict[str, Any]:
    """What MLflow's S3 store adds to every upload (encryption, ACL, bucket owner)."""
    extra: dict[str, Any] = {}
    if owner := env.get("MLFLOW_S3_EXPECTED_BUCKET_OWNER"):
        extra["ExpectedBucketOwner"] = owner
    if raw := env.get("MLFLOW_S3_UPLOAD_EXTRA_ARGS"):
        extra.update(json.loads(raw))
    return extra


def describe(exc: BaseException, settings: S3Settings) -> str:
    """A short reason for ``exc`` with every credential blanked out."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        text = f"S3 refused it: {error.get('Code', '?')} ({status}): {error.get('Message', '')}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    for secret in settings.secrets():
        text = text.replace(secret, "***")
    return redact(text)


def is_transient(exc: BaseException) -> bool:
    import aiohttp
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return isinstance(
        exc,
        (BotoConnectionError, HTTPClientError, aiohttp.ClientError, ConnectionError, TimeoutError),
    )


class S3Uploader:
    """Uploads staged files under one ``s3://bucket/prefix`` for one job."""

    def __init__(self, jobs: JobContext, uri: str, counters: FileCounters) -> None:
        self.jobs = jobs
        self.config = jobs.config
        self.bucket, self.prefix = split_s3_uri(uri)
        self.counters = counters
        self.settings = S3Settings.from_env()
        self.extra = json.loads(self.settings.extra_args)
        self.client: Any = None

    async def __call__(self, staged: StagedFile, slots: asyncio.Semaphore) -> None:
        key = join(self.prefix, staged.dest)
        args = {**_content_headers(staged.dest), **self.extra}
        try:
            if self.client is None:
                self.client = await _client(self.jobs, self.settings)
            if staged.size >= self.config.multipart_threshold:
                await self._multipart(staged, key, args, slots)
            else:
                async with slots:
                    await self._send(
                        self.client.put_object, staged.path, 0, staged.size, Key=key, **args
                    )
        except UploadFailed:
            raise
        except Exception as exc:
            raise UploadFailed(describe(exc, self.settings)) from None

    async def _send(
        self,
        operation: Callable[..., Awaitable[T]],
        path: str,
        offset: int,
        size: int,
        digests: tuple[str, str] | None = None,
        **args: Any,
    ) -> T:
        """Send bytes [offset, offset + size) of ``path`` with ``operation`` (a put or a part),
        retrying transient failures. The signature covers the body's SHA-256, so the server
        refuses bytes altered on the way. ``digests``: the window's (SHA-256, CRC32) if
        already computed."""
        body: Any
        if size <= _CHUNK and digests is None:
            body = await self.jobs.run_blocking(partial(_read, path, offset, size))
        else:
            if digests is None:
                digests = await self.jobs.run_blocking(partial(_digests, path, offset, size))
            body = _FileWindow(self.jobs, path, offset, size, digests[0])
        call = partial(operation, Bucket=self.bucket, Body=body, ContentLength=size, **args)
        return await self._retrying(size, call)

    async def _multipart(
        self, staged: StagedFile, key: str, args: dict[str, Any], slots: asyncio.Semaphore
    ) -> None:
        part_size = max(self.config.multipart_part_size, math.ceil(staged.size / _MAX_PARTS))
        count = max(1, math.ceil(staged.size / part_size))
        # Each part's CRC32 goes in a plain header (not the aws-chunked trailer some
        # S3-compatible servers refuse): the server checks every part, and completes the
        # upload from the parts' checksums instead of re-reading the whole object.
        crc = self.config.multipart_checksums
        if crc:
            args = {**args, "ChecksumAlgorithm": "CRC32"}
        create = partial(self.client.create_multipart_upload, Bucket=self.bucket, Key=key, **args)
        created = await self._retrying(0, create)
        upload_id = created["UploadId"]
        etags: dict[int, dict[str, Any]] = {}
        numbers = iter(range(1, count + 1))

        async def send_parts() -> None:
            for number in numbers:  # shared iterator: each sender takes the next part
                offset = (number - 1) * part_size
                length = min(part_size, staged.size - offset)
                async with slots:
                    digests = await self.jobs.run_blocking(
                        partial(_digests, staged.path, offset, length)
                    )
                    checksum = {"ChecksumCRC32": digests[1]} if crc else {}
                    response = await self._send(
                        self.client.upload_part,
                        staged.path,
                        offset,
                        length,
                        digests,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        **checksum,
                    )
                etags[number] = {"ETag": response["ETag"], "PartNumber": number, **checksum}

        try:
            senders = min(count, self.config.max_concurrent_uploads)
            await _all_or_none(send_parts() for _ in range(senders))
            parts = [etags[n] for n in range(1, count + 1)]
            complete = partial(
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            await self._retrying(0, complete)
        except BaseException:
            # Parts of an upload never completed are billed until aborted.
            await _quietly(
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            )
            raise

    async def _retrying(self, size: int, call: Callable[[], Awaitable[T]]) -> T:
        """The one retry policy, with S3's answers sorted into transient and refused."""

        async def sorted_call() -> T:
            try:
                return await call()
            except Exception as exc:
                reason = describe(exc, self.settings)
                if is_transient(exc):
                    raise Transient(f"S3 upload: {reason}") from None
                raise Refused(reason, splittable=False) from None

        def retrying(exc: Transient) -> None:
            self.jobs.note_transient(str(exc))
            self.counters.retried(size)

        result = await _RETRY.attempt(sorted_call, retrying)
        if isinstance(result, Refused):
            raise UploadFailed(result.reason)
        if isinstance(result, Held):
            raise result
        return result


class UploadFailed(Exception):
    """An upload failed for good; the message is safe to show (no credentials)."""


def _content_headers(dest: str) -> dict[str, str]:
    """Content type and encoding as MLflow's S3 store sets them (``mimetypes``)."""
    content_type, encoding = mimetypes.guess_type(dest)
    headers = {}
    if content_type:
        headers["ContentType"] = content_type
    if encoding:
        headers["ContentEncoding"] = encoding
    return headers


class _FileWindow:
    """An upload body streamed from bytes [offset, offset + size) of a staged file.

    aiohttp sends it as it iterates, one chunk read at a time on the engine's I/O threads,
    so a request holds one chunk in memory, not its part; each request iterates afresh, so
    a retry resends from the start. ``sha256`` (computed beforehand on an I/O thread) goes
    into the signature in place of botocore's own hashing, which would read the whole body
    on the loop thread. It has no ``read``: botocore would add ``Expect: 100-continue`` to
    file-like bodies, a round trip per request.
    """

    def __init__(self, jobs: JobContext, path: str, offset: int, size: int, sha256: str) -> None:
        self._jobs = jobs
        self._path = path
        self._offset = offset
        self._size = size
        self.sha256 = sha256

    def __len__(self) -> int:
        return self._size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        fd = os.open(self._path, os.O_RDONLY)
        try:
            position, end = self._offset, self._offset + self._size
            while position < end:
                length = min(_CHUNK, end - position)
                chunk = await self._jobs.run_blocking(partial(os.pread, fd, length, position))
                if not chunk:
                    raise OSError(f"{self._path} is shorter than when it was staged")
                position += len(chunk)
                yield chunk
        finally:
            os.close(fd)


def _register_signer() -> None:
    """Add :class:`_KnownPayloadSigV4` to botocore's signers (botocore is imported late:
    ``import asynctrack`` must stay cheap)."""
    import botocore.auth

    class _KnownPayloadSigV4(botocore.auth.S3SigV4Auth):  # type: ignore[misc]
        """S3's SigV4, taking the payload hash a :class:`_FileWindow` carries."""

        def payload(self, request: Any) -> str:
            known: str | None = getattr(request.body, "sha256", None)
            if known is not None and self._should_sha256_sign_payload(request):
                return known
            result: str = super().payload(request)
            return result

    botocore.auth.AUTH_TYPE_MAPS.setdefault(_SIGNER, _KnownPayloadSigV4)


def _choose_signer(signature_version: Any = None, **_: Any) -> str | None:
    return _SIGNER if signature_version == "s3v4" else None


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _digests(path: str, offset: int, size: int) -> tuple[str, str]:
    """The hex SHA-256 and base64 CRC32 of a window of ``path``, read a chunk at a time
    (hashlib and zlib release the GIL, so this runs beside the loop)."""
    digest, crc = hashlib.sha256(), 0
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return digest.hexdigest(), base64.b64encode(crc.to_bytes(4, "big")).decode()


async def _client(jobs: JobContext, settings: S3Settings) -> Any:
    """The engine's client for these settings, created on first use."""
    resources = jobs.resources
    clients = resources.s3_clients
    async with resources.s3_lock:  # two jobs starting together must not both build a client
        client: Any = clients.get(settings)
        if client is None:
            client = await resources.exit_stack.enter_async_context(_new_client(jobs, settings))
            for operation in ("PutObject", "UploadPart"):
                client.meta.events.register(f"choose-signer.s3.{operation}", _choose_signer)
            clients[settings] = client
    return client


def _new_client(jobs: JobContext, settings: S3Settings) -> Any:
    import botocore
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    _register_signer()
    config = jobs.config
    signature: Any = settings.signature_version
    if signature.lower() == "unsigned":  # public buckets, as MLflow allows
        signature = botocore.UNSIGNED
    return get_session().create_client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
        verify=None if settings.verify else False,
        config=AioConfig(
            signature_version=signature,
            s3={"addressing_style": settings.addressing_style},
            # Streamed bodies (_FileWindow) are not the file objects its validation expects.
            parameter_validation=False,
            max_pool_connections=config.max_concurrent_uploads + 2,
            connect_timeout=config.request_timeout,
            read_timeout=config.request_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            # MinIO and other S3-compatible servers reject the CRC headers botocore now
            # adds by default; send checksums only where S3 requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


async def _all_or_none(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run ``coros`` together; on the first failure cancel the rest, then raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _quietly(call: Awaitable[Any]) -> None:
    try:
        await call
    except Exception:  # the upload's own error is the one worth reporting
        return
