"""Reading ranked result rows back with the caller's id types, page by page or all at once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
from pydantic_core import from_json, to_json
from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import Session

from service.db.tables import Attribution, AttributionQuery, Dataset, ResultChunk
from service.pagination import RankCursor
from service.schemas.attributions import ResultIdTypes, ResultRow, caller_id
from worker.methods.registry import get_method


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A stored result row as read back from its chunk: ids are text."""

    query_pos: int
    query_id: str | None
    direction: str
    rank: int
    train_id: str
    score: float
    task: int | None
    split: int | None
    query_token: int | None
    query_token_text: str | None


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


CHUNK_HEADER = (ResultChunk.query_pos, ResultChunk.first_rank, ResultChunk.last_rank)
CHUNK_COLUMNS = (
    *CHUNK_HEADER,
    ResultChunk.direction,
    ResultChunk.query_id,
    ResultChunk.query_token,
    ResultChunk.query_token_text,
    ResultChunk.train_ids,
    ResultChunk.scores,
    ResultChunk.tasks,
    ResultChunk.splits,
)


def _integers(packed: bytes | None, start: int, stop: int) -> list[int | None]:
    if packed is None:
        return [None] * (stop - start)
    return np.frombuffer(packed, dtype="<i8")[start:stop].tolist()


def chunk_rows(chunk: Any, after: RankCursor | None, limit: int) -> list[StoredResult]:
    """Up to ``limit`` rows of a chunk (a row of CHUNK_COLUMNS), those after the cursor, in rank order."""
    skip = max(0, after.rank - chunk.first_rank + 1) if after is not None and after.query_pos == chunk.query_pos else 0
    stop = min(chunk.last_rank - chunk.first_rank + 1, skip + limit)
    if stop <= skip:
        return []
    train_ids = from_json(chunk.train_ids)[skip:stop]
    scores = np.frombuffer(chunk.scores, dtype="<f8")[skip:stop].tolist()
    tasks, splits = _integers(chunk.tasks, skip, stop), _integers(chunk.splits, skip, stop)
    count = stop - skip
    # positional arguments, the query row's values repeated: about 15% cheaper than keyword construction
    return list(
        map(
            StoredResult,
            repeat(chunk.query_pos, count),
            repeat(chunk.query_id, count),
            repeat(chunk.direction, count),
            range(chunk.first_rank + skip, chunk.first_rank + stop),
            train_ids,
            scores,
            tasks,
            splits,
            repeat(chunk.query_token, count),
            repeat(chunk.query_token_text, count),
        )
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


def chunk_query(
    columns: Sequence[Any],
    attribution_id: str,
    direction: str,
    after: RankCursor | None,
    limit: int,
    query_pos: int | None = None,
) -> Select[*tuple[Any, ...]]:
    """The first ``limit`` chunks (``columns`` of them) of one direction (and one query row) that hold rows after
    the cursor, in key order.

    The cursor is a row-value comparison on (query_pos, last_rank): PostgreSQL and SQLite read the chunks as one
    range of the primary key (attribution_id, direction, query_pos, last_rank) that starts at the cursor, in key
    order, with no sort, so a page costs the same at any depth (tests/service/test_result_storage.py checks the
    plans). A per-token query row (one token of one query) has its own query_pos, so the cursor needs nothing more.
    """
    query = select(*columns).where(ResultChunk.attribution_id == attribution_id, ResultChunk.direction == direction)
    if query_pos is not None:  # one query row's chunks (the cursor is at or before that query row)
        query = query.where(ResultChunk.query_pos == query_pos)
        if after is not None and after.query_pos == query_pos:
            query = query.where(ResultChunk.last_rank > after.rank)
        return query.order_by(ResultChunk.last_rank).limit(limit)
    if after is not None:
        query = query.where(tuple_(ResultChunk.query_pos, ResultChunk.last_rank) > tuple_(*after))
    return query.order_by(ResultChunk.query_pos, ResultChunk.last_rank).limit(limit)


FIRST_CHUNKS = 2  # chunks a page reads at once: most pages (at most 1,001 rows) lie in one or two


def read_rows(
    session: Session,
    attribution_id: str,
    direction: str,
    after: RankCursor | None,
    limit: int,
    query_pos: int | None = None,
) -> list[StoredResult]:
    """The first ``limit`` rows after the cursor (of one query row). The first `FIRST_CHUNKS` chunks are read
    whole, which serves most pages in one statement; when the page needs more, the following chunks' ranks (a few
    integers per chunk; each chunk found holds at least one row after the cursor, so ``limit`` of them are enough)
    say how many, and only those are read."""
    rows: list[StoredResult] = []
    statement = chunk_query(CHUNK_COLUMNS, attribution_id, direction, after, FIRST_CHUNKS, query_pos)
    chunks = session.execute(statement).all()
    for chunk in chunks:
        rows.extend(chunk_rows(chunk, after, limit - len(rows)))
    if len(rows) >= limit or len(chunks) < FIRST_CHUNKS:
        return rows
    after = RankCursor(chunks[-1].query_pos, chunks[-1].last_rank)  # every row of the chunks read is taken
    wanted, needed = limit - len(rows), 0
    for header in session.execute(chunk_query(CHUNK_HEADER, attribution_id, direction, after, wanted, query_pos)):
        wanted -= header.last_rank - header.first_rank + 1
        needed += 1
        if wanted <= 0:
            break
    if needed:
        for chunk in session.execute(chunk_query(CHUNK_COLUMNS, attribution_id, direction, after, needed, query_pos)):
            rows.extend(chunk_rows(chunk, after, limit - len(rows)))
    return rows


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


_FinishedPositionsKey = tuple[str, str | None, int | None, int, int]
_finished_positions: OrderedDict[_FinishedPositionsKey, tuple[int, ...]] = OrderedDict()


def matching_positions(
    session: Session, attribution_id: str, query_id: str | None, query_token: int | None, start: int, limit: int
) -> tuple[int, ...]:
    """`query_positions`' answer, remembered by this process (FINISHED_CACHE_SIZE answers at most): a finished
    attribution's query rows are written with its results, in one transaction, and never change or go away, so
    a filtered page that asked before costs one statement, its chunks. An empty answer (no such query, or no
    results yet) is not remembered."""
    key = (attribution_id, query_id, query_token, start, limit)
    with _finished_lock:
        known = _finished_positions.get(key)
    if known is not None:
        return known
    positions = tuple(session.scalars(query_positions(attribution_id, query_id, query_token, start, limit)))
    if positions:
        with _finished_lock:
            _finished_positions[key] = positions
            _finished_positions.move_to_end(key)
            while len(_finished_positions) > FINISHED_CACHE_SIZE:
                _finished_positions.popitem(last=False)
    return positions


def page_of_results(
    session: Session,
    attribution_id: str,
    direction: str,
    query_id: str | None,
    after: RankCursor | None,
    size: int,
    query_token: int | None = None,
) -> tuple[Sequence[StoredResult], RankCursor | None]:
    """One page of rows and the cursor of the next page (None after the last row).

    Unfiltered: one range of the chunks' primary key (`read_rows`). Filtered by query_id and/or query_token: the
    matching query rows from the cursor's query_pos on (one range of a small index, at most ``size + 2`` of them:
    each after the cursor's own has at least one row in each direction; remembered, `matching_positions`), then
    each one's chunks as a range of the primary key until the page is full -- none of the statements reads rows
    before the cursor.
    """
    if query_id is None and query_token is None:
        rows = read_rows(session, attribution_id, direction, after, size + 1)
    else:
        start = after.query_pos if after is not None else 0
        positions = matching_positions(session, attribution_id, query_id, query_token, start, size + 2)
        rows = []
        for query_pos in positions:
            rows.extend(read_rows(session, attribution_id, direction, after, size + 1 - len(rows), query_pos))
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
    query = select(*CHUNK_COLUMNS).where(ResultChunk.attribution_id == attribution_id)
    if query_token is not None:
        query = query.where(ResultChunk.query_token == query_token)
    query = query.order_by(ResultChunk.query_pos, ResultChunk.direction.desc(), ResultChunk.last_rank)
    for chunk in session.execute(query.execution_options(yield_per=20)):
        yield from chunk_rows(chunk, None, chunk.last_rank - chunk.first_rank + 1)
