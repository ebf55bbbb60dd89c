"""Writing result rows in bulk, inside the caller's transaction (the one that also marks the job succeeded).

PostgreSQL: ``COPY attribution_results (...) FROM STDIN (FORMAT BINARY)`` through psycopg 3's copy API on the
session's own connection (binary: psycopg's C dumpers and no text to parse; doubles go over exactly as they are). SQLite: the driver's ``executemany`` of plain tuples in batches, one statement per direction that binds
only the columns that vary from row to row (the attribution, the direction and columns without values are written
into the statement: a fifth fewer bindings for a full ranking). Another database: Core inserts. Then the
attribution's query rows (``attribution_queries``: one per query_pos, a few hundred at most for most jobs) by one
Core executemany. No path builds an ORM object, and none commits: the rows become visible with the job's final
status when the caller's transaction commits, or never, when it rolls back.

Rows go in the order of the table's primary key (`key_ordered_parts`: direction ``negative`` before
``positive``, then query_pos, then rank): each insert then lands at the right end of the key's b-tree, where
both databases append without searching (a full ranking's write took a quarter less time on PostgreSQL than with
the ``positive`` rows first).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, cast

import numpy as np
from sqlalchemy import BigInteger, Column, Connection, Double, Integer, String, Table, insert
from sqlalchemy.orm import Session

from service.db.tables import AttributionQuery, AttributionResult
from worker.tasks.rows import DIRECTIONS, RESULT_FIELDS, ResultColumns

TABLE = AttributionResult.__tablename__
COLUMNS = ("attribution_id", *RESULT_FIELDS)


def _copy_type(column: Column[Any]) -> str:
    """The PostgreSQL type of a result column, as binary COPY needs it exactly."""
    for kind, name in ((BigInteger, "int8"), (Integer, "int4"), (Double, "float8"), (String, "varchar")):
        if isinstance(column.type, kind):
            return name
    raise TypeError(f"no binary COPY type for {column.name}: {column.type!r}")


COPY_TYPES = {name: _copy_type(cast(Table, AttributionResult.__table__).c[name]) for name in COLUMNS}
EXECUTEMANY_BATCH = 20_000
SQLITE_WRITE_CACHE_KIB = 64 * 1024


def write_results(session: Session, attribution_id: str, columns: ResultColumns) -> None:
    """Insert every row of ``columns`` for ``attribution_id`` in ``session``'s transaction."""
    if len(columns) == 0:
        return
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        _copy_rows(connection.connection.driver_connection, attribution_id, columns)
    elif dialect.paramstyle == "qmark":  # sqlite3
        _executemany_rows(connection, attribution_id, columns)
    else:
        rows = ((attribution_id, *row) for row in columns.tuples())
        for batch in _batches(rows, EXECUTEMANY_BATCH):
            connection.execute(
                insert(cast(Table, AttributionResult.__table__)),
                [dict(zip(COLUMNS, row, strict=True)) for row in batch],
            )
    connection.execute(insert(cast(Table, AttributionQuery.__table__)), query_rows(attribution_id, columns))


def query_rows(attribution_id: str, columns: ResultColumns) -> list[dict[str, Any]]:
    """One row per distinct query_pos of ``columns``: its query_id and query_token (the same on all its rows)."""
    positions, first = np.unique(columns.query_pos, return_index=True)
    query_id = columns.query_id[first].tolist() if columns.query_id is not None else [None] * len(first)
    query_token = columns.query_token[first].tolist() if columns.query_token is not None else [None] * len(first)
    return [
        {"attribution_id": attribution_id, "query_pos": position, "query_id": qid, "query_token": token}
        for position, qid, token in zip(positions.tolist(), query_id, query_token, strict=True)
    ]


def key_ordered_parts(columns: ResultColumns) -> Iterator[tuple[str, ResultColumns]]:
    """The rows of each direction in primary-key order: directions as the databases sort them (byte order of the
    names), each one's rows by (query_pos, rank); rows already in that order (the scoring loops make them so)
    are not sorted again."""
    for direction in sorted(DIRECTIONS):
        part = columns.where(columns.direction == direction)
        if len(part) == 0:
            continue
        position, rank = part.query_pos.astype(np.int64), part.rank.astype(np.int64)
        position_step, rank_step = np.diff(position), np.diff(rank)
        if not bool(((position_step > 0) | ((position_step == 0) & (rank_step > 0))).all()):
            part = part.take(np.lexsort((rank, position)))
        yield direction, part


def _copy_rows(driver_connection: Any, attribution_id: str, columns: ResultColumns) -> None:
    """psycopg 3: stream the rows through a binary COPY on the transaction's own connection. Only the columns that
    hold values are copied (the others are NULL by default): a plain ranking sends six columns of its eleven.
    (Encoding the stream column by column with numpy instead took more CPU time than psycopg's C dumpers row by
    row.)"""
    fields = [name for name in RESULT_FIELDS if getattr(columns, name) is not None]
    names = ["attribution_id", *fields]
    statement = f"COPY {TABLE} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)"
    with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types([COPY_TYPES[name] for name in names])
        for _, part in key_ordered_parts(columns):
            for row in part.tuples(fields):
                copy.write_row((attribution_id, *row))


def _executemany_rows(connection: Connection, attribution_id: str, columns: ResultColumns) -> None:
    """The driver's executemany of plain tuples, in batches that bound the memory held at once. SQLite's page
    cache is raised for the write (a full ranking's index pages would otherwise spill to the WAL mid-transaction)
    and put back after it, as the connection returns to a pool shared with the API."""
    cache_size = connection.exec_driver_sql("PRAGMA cache_size").scalar()
    connection.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_WRITE_CACHE_KIB}")
    written = 0
    try:
        for direction, part in key_ordered_parts(columns):
            written += len(part)
            fixed: dict[str, str | None] = {"attribution_id": attribution_id, "direction": direction}
            fixed.update({name: None for name in RESULT_FIELDS if getattr(part, name) is None})
            bound = [name for name in RESULT_FIELDS if name not in fixed]
            statement = (
                f"INSERT INTO {TABLE} ({', '.join([*fixed, *bound])}) "
                f"VALUES ({', '.join([*map(_sql_literal, fixed.values()), *'?' * len(bound)])})"
            )
            for batch in _batches(part.tuples(bound), EXECUTEMANY_BATCH):
                connection.exec_driver_sql(statement, batch)
    finally:
        connection.exec_driver_sql(f"PRAGMA cache_size = {int(cast(int, cache_size))}")
    assert written == len(columns)  # every row has one of the directions


def _sql_literal(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def _batches(rows: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch
