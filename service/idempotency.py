"""`Idempotency-Key` on POST: a repeat with the same key and body gets the original response, even when the
repeats arrive at the same time.

The first request with a key *reserves* it (a row with ``status_code`` 0, committed at once in its own
transaction); the resource it creates and the final response are committed together later, in the request's own
transaction. A concurrent request with the same key waits, in the event loop (holding no thread and no
connection), until the reservation is completed, and then replays it; if the first request fails, its
reservation is released and the next request goes ahead. A reservation older than ``STALE_RESERVATION_SECONDS``
belongs to a process that died and is taken over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.db.base import utcnow
from service.db.session import affected_rows, session_scope
from service.db.tables import IdempotentResponse
from service.dependencies import TenantDep
from service.problems import ProblemError

RESERVED = 0  # status_code of a reservation whose request has not finished
STALE_RESERVATION_SECONDS = 600
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.05


def request_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable_encoder(body), sort_keys=True).encode()).hexdigest()


def _route(request: Request) -> str:
    return f"{request.method} {request.url.path}"


def _reserve(url: str, tenant_id: str, key: str, route: str) -> str:
    """'owned' (this request reserved the key), 'done' (a response is stored) or 'busy' (another request holds it)."""
    with session_scope(url) as session:
        stale_before = utcnow() - timedelta(seconds=STALE_RESERVATION_SECONDS)
        taken_over = affected_rows(
            session,
            update(IdempotentResponse)
            .where(
                IdempotentResponse.tenant_id == tenant_id,
                IdempotentResponse.key == key,
                IdempotentResponse.route == route,
                IdempotentResponse.status_code == RESERVED,
                IdempotentResponse.created_at < stale_before,
            )
            .values(created_at=utcnow()),
        )
        if taken_over:
            return "owned"
    try:
        with session_scope(url) as session:
            session.add(
                IdempotentResponse(
                    tenant_id=tenant_id,
                    key=key,
                    route=route,
                    request_hash="",
                    status_code=RESERVED,
                    body={},
                    headers={},
                    created_at=utcnow(),
                )
            )
        return "owned"
    except IntegrityError:
        pass
    with session_scope(url) as session:
        status = session.scalar(
            select(IdempotentResponse.status_code).where(
                IdempotentResponse.tenant_id == tenant_id,
                IdempotentResponse.key == key,
                IdempotentResponse.route == route,
            )
        )
    if status is None:
        return "busy"  # released between our insert and this read: try again
    return "busy" if status == RESERVED else "done"


def _release(url: str, tenant_id: str, key: str, route: str) -> None:
    with session_scope(url) as session:
        session.execute(
            delete(IdempotentResponse).where(
                IdempotentResponse.tenant_id == tenant_id,
                IdempotentResponse.key == key,
                IdempotentResponse.route == route,
                IdempotentResponse.status_code == RESERVED,
            )
        )


async def idempotency_guard(
    request: Request,
    tenant: TenantDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="Makes a retried POST safe: a repeat with the same key and body gets the first response.",
        ),
    ] = None,
) -> AsyncIterator[str | None]:
    """Reserve the key for this request, or wait for the request that holds it; yields the key (or None)."""
    if idempotency_key is None:
        yield None
        return
    url = request.app.state.settings.resolved_database_url
    route = _route(request)
    deadline = time.monotonic() + WAIT_SECONDS
    while (state := await run_in_threadpool(_reserve, url, tenant.id, idempotency_key, route)) == "busy":
        if time.monotonic() > deadline:
            raise ProblemError(
                409,
                "a request with this Idempotency-Key is still in progress; retry later",
                kind="idempotency-key-in-use",
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(POLL_SECONDS)
    if state == "done":
        yield idempotency_key  # the route replays the stored response
        return
    try:
        yield idempotency_key
    except BaseException:
        await run_in_threadpool(_release, url, tenant.id, idempotency_key, route)
        raise


IdempotencyKey = Annotated[str | None, Depends(idempotency_guard, scope="function")]


def _stored(session: Session, tenant_id: str, key: str, route: str) -> IdempotentResponse | None:
    return session.scalar(
        select(IdempotentResponse).where(
            IdempotentResponse.tenant_id == tenant_id, IdempotentResponse.key == key, IdempotentResponse.route == route
        )
    )


def replay(session: Session, tenant_id: str, key: str | None, route: str, body: Any) -> JSONResponse | None:
    """The stored response for this key, or None when this request is the one to answer it (or has no key)."""
    if key is None:
        return None
    stored = _stored(session, tenant_id, key, route)
    if stored is None or stored.status_code == RESERVED:
        return None
    if stored.request_hash != request_hash(body):
        raise ProblemError(
            422, "this Idempotency-Key was already used with a different request body", kind="idempotency-key-reused"
        )
    return JSONResponse(stored.body, status_code=stored.status_code, headers=stored.headers)


def remember(
    session: Session,
    tenant_id: str,
    key: str | None,
    route: str,
    body: Any,
    status_code: int,
    response: Any,
    headers: dict[str, str],
) -> JSONResponse:
    """The response, stored under the key (completing this request's reservation) in the request's transaction."""
    content = jsonable_encoder(response)
    if key is not None:
        stored = _stored(session, tenant_id, key, route)
        if stored is None:  # the reservation was taken over as stale; store the response all the same
            stored = IdempotentResponse(tenant_id=tenant_id, key=key, route=route, created_at=utcnow())
            session.add(stored)
        stored.request_hash, stored.status_code = request_hash(body), status_code
        stored.body, stored.headers = content, headers
        session.flush()
    return JSONResponse(content, status_code=status_code, headers=headers)
