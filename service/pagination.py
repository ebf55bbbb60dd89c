"""Opaque cursor tokens: base64url of a JSON array whose items are checked against a typed cursor.

A token is only ever decoded into the cursor type of the list it pages, with strict types and bounds, so a forged
token (wrong types, huge numbers, nested objects) is a 400 problem, never a database error.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, TypeVar

from fastapi import Query
from pydantic import Field, StrictInt, StrictStr, TypeAdapter, ValidationError

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.orm import Session

from service.problems import ProblemError

MAX_TOKEN_LENGTH = 512
CursorInt = Annotated[StrictInt, Field(ge=0, le=2**62)]
CursorId = Annotated[StrictStr, Field(min_length=1, max_length=64)]

PageTokenQuery = Annotated[
    str | None,
    Query(max_length=MAX_TOKEN_LENGTH, description="The `next_page_token` of the previous page; absent for the first."),
]


class NewestFirstCursor(NamedTuple):
    """Lists ordered by (created_at desc, id desc)."""

    created_at: datetime
    id: CursorId


class RankCursor(NamedTuple):
    """Ranked results ordered by (query position, rank)."""

    query_pos: CursorInt
    rank: CursorInt


class CheckpointCursor(NamedTuple):
    """Checkpoints ordered by (stage, step, id)."""

    stage: CursorInt
    step: CursorInt
    id: CursorId


CursorT = TypeVar("CursorT", NewestFirstCursor, RankCursor, CheckpointCursor)
_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {
    cursor: TypeAdapter(cursor) for cursor in (NewestFirstCursor, RankCursor, CheckpointCursor)
}


def encode_token(cursor: NewestFirstCursor | RankCursor | CheckpointCursor) -> str:
    values = [value.isoformat() if isinstance(value, datetime) else value for value in cursor]
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_token(token: str, cursor: type[CursorT]) -> CursorT:
    try:
        padded = token + "=" * (-len(token) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()).decode())
        if not isinstance(values, list):
            raise ValueError("not a list")
        decoded: CursorT = _ADAPTERS[cursor].validate_python(tuple(values))
    except (ValueError, UnicodeDecodeError, binascii.Error, ValidationError, RecursionError) as exc:
        raise ProblemError(
            400, "page_token is not a token this API issued", kind="invalid-page-token", title="Invalid page token"
        ) from exc
    if isinstance(decoded, NewestFirstCursor) and decoded.created_at.tzinfo is None:
        raise ProblemError(
            400, "page_token is not a token this API issued", kind="invalid-page-token", title="Invalid page token"
        )
    return decoded


def clamp_page_size(page_size: int, cap: int) -> int:
    return max(1, min(page_size, cap))


def page_newest_first(
    session: Session, query: Select[Any], table: Any, size: int, token: str | None
) -> tuple[list[Any], str | None]:
    """One page of ``query`` ordered newest first by (created_at, id), and the token of the next page."""
    from sqlalchemy import tuple_

    if token:
        after = decode_token(token, NewestFirstCursor)
        query = query.where(tuple_(table.created_at, table.id) < (after.created_at, after.id))
    rows = list(session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(size + 1)))
    if len(rows) <= size:
        return rows, None
    last = rows[size - 1]
    return rows[:size], encode_token(NewestFirstCursor(last.created_at, last.id))
