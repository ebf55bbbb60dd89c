"""Opaque cursor tokens for lists ordered by (created_at desc, id desc) and for ranked results."""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.orm import Session

from service.problems import ProblemError


def encode_token(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode().rstrip("=")


def decode_token(token: str, length: int) -> list[Any]:
    try:
        padded = token + "=" * (-len(token) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProblemError(400, "page_token is not a token this API issued", kind="invalid-page-token") from exc
    if not isinstance(values, list) or len(values) != length:
        raise ProblemError(400, "page_token is not a token this API issued", kind="invalid-page-token")
    return values


def clamp_page_size(page_size: int, cap: int) -> int:
    return max(1, min(page_size, cap))


def page_newest_first(
    session: "Session", query: "Select[Any]", table: Any, size: int, token: str | None
) -> tuple[list[Any], str | None]:
    """One page of ``query`` ordered newest first by (created_at, id), and the token of the next page."""
    from datetime import datetime

    from sqlalchemy import tuple_

    if token:
        created, ident = decode_token(token, 2)
        try:
            after = (datetime.fromisoformat(created), str(ident))
        except (TypeError, ValueError) as exc:
            raise ProblemError(400, "page_token is not a token this API issued", kind="invalid-page-token") from exc
        query = query.where(tuple_(table.created_at, table.id) < after)
    rows = list(session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(size + 1)))
    if len(rows) <= size:
        return rows, None
    last = rows[size - 1]
    return rows[:size], encode_token([last.created_at.isoformat(), last.id])
