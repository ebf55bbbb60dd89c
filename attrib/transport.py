"""Sending one logical request: retries with backoff on 429 / 503 / connection errors, one Idempotency-Key per POST,
problem documents raised as typed exceptions. Sync and async twins share everything but the waiting."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from attrib.errors import ConnectionFailed, error_from_response
from attrib.payloads import FilePart

RETRY_STATUSES = frozenset({429, 502, 503, 504})  # 429 and 503 carry a Retry-After, which is honoured


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; waits ``backoff × 2^n`` seconds (capped, with jitter) or the Retry-After."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_backoff)
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)


@dataclass
class Call:
    """One logical API call. A POST gets one Idempotency-Key, reused by every retry."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    form: dict[str, str] | None = None
    files: list[FilePart] = field(default_factory=list)
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        if self.method == "POST" and self.idempotency_key is None:
            self.idempotency_key = uuid.uuid4().hex

    def build(self, client: httpx.Client | httpx.AsyncClient, stack: ExitStack) -> httpx.Request:
        headers = {"Idempotency-Key": self.idempotency_key} if self.idempotency_key else None
        files = [
            (part.field, (part.filename, stack.enter_context(part.open()), "application/octet-stream"))
            for part in self.files
        ] or None
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        return client.build_request(
            self.method, self.path, params=params, json=self.json, data=self.form, files=files, headers=headers
        )


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_from_response(response)
    return response


def send(client: httpx.Client, call: Call, retry: RetryPolicy) -> httpx.Response:
    """Send ``call`` (reading the whole body), retrying what can be retried; raise typed errors."""
    with stream(client, call, retry) as response:
        response.read()
        return response


@contextmanager
def stream(client: httpx.Client, call: Call, retry: RetryPolicy) -> Iterator[httpx.Response]:
    """Like :func:`send` but the body is left to be streamed by the caller."""
    for attempt in range(retry.attempts):
        last = attempt == retry.attempts - 1
        with ExitStack() as stack:
            try:
                response = client.send(call.build(client, stack), stream=True)
            except httpx.TransportError as exc:
                if last:
                    raise ConnectionFailed(f"{call.method} {call.path}: {exc}") from exc
                time.sleep(retry.delay(attempt, None))
                continue
            try:
                if response.status_code in RETRY_STATUSES and not last:
                    response.close()
                    time.sleep(retry.delay(attempt, response))
                    continue
                if response.status_code >= 400:
                    response.read()
                check(response)
                yield response
                return
            finally:
                response.close()
    raise AssertionError("unreachable")  # pragma: no cover


async def send_async(client: httpx.AsyncClient, call: Call, retry: RetryPolicy) -> httpx.Response:
    async with stream_async(client, call, retry) as response:
        await response.aread()
        return response


@asynccontextmanager
async def stream_async(client: httpx.AsyncClient, call: Call, retry: RetryPolicy) -> AsyncIterator[httpx.Response]:
    for attempt in range(retry.attempts):
        last = attempt == retry.attempts - 1
        with ExitStack() as stack:
            try:
                response = await client.send(call.build(client, stack), stream=True)
            except httpx.TransportError as exc:
                if last:
                    raise ConnectionFailed(f"{call.method} {call.path}: {exc}") from exc
                await asyncio.sleep(retry.delay(attempt, None))
                continue
            try:
                if response.status_code in RETRY_STATUSES and not last:
                    await response.aclose()
                    await asyncio.sleep(retry.delay(attempt, response))
                    continue
                if response.status_code >= 400:
                    await response.aread()
                check(response)
                yield response
                return
            finally:
                await response.aclose()
    raise AssertionError("unreachable")  # pragma: no cover
