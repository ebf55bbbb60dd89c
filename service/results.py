"""Reading ranked result rows back with the caller's id types, page by page or all at once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from pydantic_core import to_json
from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session

from service.db.tables import Attribution, AttributionQuery, AttributionResult, Dataset
from service.pagination import RankCursor
from service.schemas.attributions import ResultIdTypes, ResultRow, caller_id
from worker.methods.registry import get_method


class StoredResult(Protocol):
    """A stored result row as read back (a row of RESULT_COLUMNS, or a table row): ids are text."""

    @property
    def query_pos(self) -> int: ...
    @property
    def query_id(self) -> str | None: ...
    @property
    def direction(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def train_id(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def task(self) -> int | None: ...
    @property
    def split(self) -> int | None: ...
    @property
    def query_token(self) -> int | None: ...
    @property
    def query_token_text(self) -> str | None: ...


def id_types(session: Session, attribution: Attribution) -> ResultIdTypes:
    """Rows name dataset examples by their ids (as the dataset has them: text or integers) or tasks by their
    integer task ids, as the method declares (`Method.train_unit`, `Method.query_unit`)."""
    method = get_method(attribution.method)
    query = session.get(Dataset, attribution.query_dataset_id) if attribution.query_dataset_id else None
    train = session.get(Dataset, attribution.train_dataset_id)
    return ResultIdTypes(
        query_ids_are_strings=bool(query and query.ids_are_strings and method.query_unit == "example"),
        train_ids_are_strings=bool(train and train.ids_are_strings and method.train_unit == "example"),
    )


FINISHED_CACHE_SIZE = 10_000
_finished_types: OrderedDict[str, tuple[str, ResultIdTypes]] = OrderedDict()
_finished_lock = threading.Lock()


def remember_finished(attribution: Attribution, types: ResultIdTypes) -> None:
    """A succeeded attribution's rows never change again: remember what reading them needs (its tenant and its id
    types), so that a results page costs one query."""
    with _finished_lock:
        _finished_types[attribution.id] = (attribution.tenant_id, types)
        _finished_types.move_to_end(attribution.id)
        while len(_finished_types) > FINISHED_CACHE_SIZE:
            _finished_types.popitem(last=False)


def known_finished(attribution_id: str, tenant_id: str) -> ResultIdTypes | None:
    """The id types of a succeeded attribution of this tenant seen before by this process, else None."""
    with _finished_lock:
        known = _finished_types.get(attribution_id)
    return known[1] if known is not None and known[0] == tenant_id else None


RESULT_COLUMNS = (
    AttributionResult.query_pos,
    AttributionResult.query_id,
    AttributionResult.direction,
    AttributionResult.rank,
    AttributionResult.train_id,
    AttributionResult.score,
    AttributionResult.task,
    AttributionResult.split,
    AttributionResult.query_token,
    AttributionResult.query_token_text,
)


def row_out(row: StoredResult, types: ResultIdTypes) -> ResultRow:
    """A stored row with the caller's id types (`from_attributes`)."""
    return ResultRow.model_validate(row, from_attributes=True, context=types)


RESULT_ROW_FIELDS = tuple(ResultRow.model_fields)


def page_json(rows: Sequence[StoredResult], types: ResultIdTypes, next_page_token: str | None) -> bytes:
    """``ResultsPage(results=[row_out(row, types) ...], next_page_token=...)`` as JSON, serialized straight from the
    stored rows (the same document, byte for byte: tests/service/test_result_storage.py). Stored rows are valid
    by construction, so a results page skips validating each of its rows again, the largest cost of a page."""
    results = []
    for row in rows:
        fields = {name: getattr(row, name) for name in RESULT_ROW_FIELDS}
        fields["query_id"] = caller_id(fields["query_id"], types.query_ids_are_strings)
        fields["train_id"] = caller_id(fields["train_id"], types.train_ids_are_strings)
        results.append(fields)
    return to_json({"results": results, "next_page_token": next_page_token})


def page_query(attribution_id: str, direction: str, after: RankCursor | None, limit: int) -> Select[*tuple[Any, ...]]:
    """The statement of one unfiltered page of RESULT_COLUMNS rows after ``after``, ordered by (query_pos, rank).

    The cursor is a row-value comparison on (query_pos, rank): PostgreSQL and SQLite read the page as one range of
    the primary key (attribution_id, direction, query_pos, rank) that starts at the cursor, in key order, with no
    sort, so a page costs the same at any depth (tests/service/test_result_storage.py checks the plans). A
    per-token query row (one token of one query) has its own query_pos, so the cursor needs nothing more.
    """
    query = select(*RESULT_COLUMNS).where(
        AttributionResult.attribution_id == attribution_id, AttributionResult.direction == direction
    )
    if after is not None:
        query = query.where(tuple_(AttributionResult.query_pos, AttributionResult.rank) > tuple_(*after))
    return query.order_by(AttributionResult.query_pos, AttributionResult.rank).limit(limit)


def query_positions(
    attribution_id: str, query_id: str | None, query_token: int | None, start: int, limit: int
) -> Select[int]:
    """The first ``limit`` query_pos values from ``start`` on of the query rows with this query_id and/or this
    query_token: a range of ``ix_queries_query_id`` (``ix_queries_query_token`` with a query_token alone) in
    query_pos order. With both, the query_id's range is read and each row checked for the token: one query's
    tokens at most."""
    query = select(AttributionQuery.query_pos).where(
        AttributionQuery.attribution_id == attribution_id, AttributionQuery.query_pos >= start
    )
    if query_id is not None:
        query = query.where(AttributionQuery.query_id == query_id)
    if query_token is not None:
        query = query.where(AttributionQuery.query_token == query_token)
    return query.order_by(AttributionQuery.query_pos).limit(limit)


def query_row_page(
    attribution_id: str, direction: str, query_pos: int, after: RankCursor | None, limit: int
) -> Select[*tuple[Any, ...]]:
    """A page of one query row's rows after ``after``: a range of the primary key, in rank order."""
    query = select(*RESULT_COLUMNS).where(
        AttributionResult.attribution_id == attribution_id,
        AttributionResult.direction == direction,
        AttributionResult.query_pos == query_pos,
    )
    if after is not None and after.query_pos == query_pos:
        query = query.where(AttributionResult.rank > after.rank)
    return query.order_by(AttributionResult.rank).limit(limit)


def page_of_results(
    session: Session,
    attribution_id: str,
    direction: str,
    query_id: str | None,
    after: RankCursor | None,
    size: int,
    query_token: int | None = None,
) -> tuple[Sequence[StoredResult], RankCursor | None]:
    """One page of RESULT_COLUMNS rows (plain rows, not ORM objects: a page is read, never changed).

    Unfiltered: one range of the primary key. Filtered by query_id and/or query_token: the matching query rows from
    the cursor's query_pos on (one range of a small index, at most ``size + 2`` of them: each after the cursor's
    own has at least one row in each direction), then each one's rows as a range of the primary key until the page
    is full -- a few statements for a page of one query row's ranking, never more than ``size + 3``, and none of
    them reads rows before the cursor.
    """
    if query_id is None and query_token is None:
        rows = list(session.execute(page_query(attribution_id, direction, after, size + 1)))
    else:
        start = after.query_pos if after is not None else 0
        positions = session.scalars(query_positions(attribution_id, query_id, query_token, start, size + 2)).all()
        rows = []
        for query_pos in positions:
            statement = query_row_page(attribution_id, direction, query_pos, after, size + 1 - len(rows))
            rows.extend(session.execute(statement))
            if len(rows) > size:
                break
    if len(rows) <= size:
        return rows, None
    return rows[:size], RankCursor(rows[size - 1].query_pos, rows[size - 1].rank)


def has_query(session: Session, attribution_id: str, query_id: str | None, query_token: int | None = None) -> bool:
    """Whether the attribution has a query row of this query (its id as a string) and/or this query token."""
    return session.scalar(query_positions(attribution_id, query_id, query_token, 0, 1)) is not None


def all_results(session: Session, attribution_id: str, query_token: int | None = None) -> Iterator[StoredResult]:
    """Every row (or every row of one query token), by query row, positive before negative, then rank."""
    query = select(*RESULT_COLUMNS).where(AttributionResult.attribution_id == attribution_id)
    if query_token is not None:
        token_rows = select(AttributionQuery.query_pos).where(
            AttributionQuery.attribution_id == attribution_id, AttributionQuery.query_token == query_token
        )
        query = query.where(AttributionResult.query_pos.in_(token_rows))
    query = query.order_by(
        AttributionResult.query_pos, AttributionResult.direction.desc(), AttributionResult.rank
    ).execution_options(yield_per=5000)
    yield from session.execute(query)
