"""`Idempotency-Key` on POST: a repeat with the same key and body gets the original response."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import IdempotentResponse
from service.problems import ProblemError


def request_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable_encoder(body), sort_keys=True).encode()).hexdigest()


def replay(session: Session, tenant_id: str, key: str | None, route: str, body: Any) -> JSONResponse | None:
    """The stored response for this key, or None when the key is new (or absent)."""
    if key is None:
        return None
    stored = session.scalar(
        select(IdempotentResponse).where(
            IdempotentResponse.tenant_id == tenant_id, IdempotentResponse.key == key, IdempotentResponse.route == route
        )
    )
    if stored is None:
        return None
    if stored.request_hash != request_hash(body):
        raise ProblemError(422, "this Idempotency-Key was already used with a different request body",
                           kind="idempotency-key-reused")
    return JSONResponse(stored.body, status_code=stored.status_code, headers=stored.headers)


def remember(
    session: Session, tenant_id: str, key: str | None, route: str, body: Any,
    status_code: int, response: Any, headers: dict[str, str],
) -> JSONResponse:
    content = jsonable_encoder(response)
    if key is not None:
        session.add(IdempotentResponse(
            tenant_id=tenant_id, key=key, route=route, request_hash=request_hash(body),
            status_code=status_code, body=content, headers=headers,
        ))
        session.flush()
    return JSONResponse(content, status_code=status_code, headers=headers)
