"""Engines and sessions. One engine per database URL per process.

The API process sizes its engine's pool from its settings (``configure_engine``) before it serves a request, so
that every admitted request can hold a connection without waiting (see ``service/admission.py``); other processes
(workers, the CLI) get a small default pool on first use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

DEFAULT_POOL_SIZE = 5
POOL_TIMEOUT_SECONDS = 10

_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()


def configure_engine(url: str, pool_size: int) -> Engine:
    """Create (or replace, when its pool is too small) the engine for ``url`` with ``pool_size`` connections."""
    with _lock:
        engine = _engines.get(url)
        if engine is not None and isinstance(engine.pool, QueuePool) and engine.pool.size() >= pool_size:
            return engine
        _engines[url] = _create(url, pool_size)
        _sessionmakers.pop(url, None)
        if engine is not None:
            engine.dispose()
        return _engines[url]


def get_engine(url: str) -> Engine:
    with _lock:
        if url not in _engines:
            _engines[url] = _create(url, DEFAULT_POOL_SIZE)
        return _engines[url]


def _create(url: str, pool_size: int) -> Engine:
    pool = {"pool_size": pool_size, "max_overflow": 4, "pool_timeout": POOL_TIMEOUT_SECONDS}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, **pool)
    event.listen(engine.pool, "checkin", _note_checkin)
    event.listen(engine.pool, "checkout", _ping_if_idle)
    return engine


# A connection back from the pool is checked with a round trip only when it sat idle long enough for the server
# (or a proxy) to have dropped it: under load, connections go straight from one request to the next, and a ping
# per checkout (SQLAlchemy's `pool_pre_ping`) would add a round trip to every request.
IDLE_PING_SECONDS = 2.0


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:  # DB-API objects: untyped by nature
    if record is not None:
        record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    idle_since = record.info.get("checked_in_at")
    if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as error:  # any failure means a dead connection: the pool replaces it
        raise DisconnectionError(f"stale pooled connection: {error}") from error


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:  # DB-API objects: untyped by nature
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    maker = _sessionmakers.get(url)
    if maker is None:
        maker = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        _sessionmakers[url] = maker
    return maker


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def read_without_transaction(session: Session) -> None:
    """Run this session's statements in autocommit: a read-only request then costs no BEGIN before its first
    statement and no ROLLBACK when its connection goes back (two round trips fewer per request on PostgreSQL).
    Each statement still reads one consistent snapshot; use it only where no two reads must agree (rows that
    never change once written, such as a succeeded attribution's results)."""
    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def affected_rows(session: Session, statement: Executable) -> int:
    """Runs an UPDATE or DELETE in ``session``; the number of rows it matched."""
    result = session.execute(statement)
    assert isinstance(result, CursorResult)  # what a DML statement answers (Session.execute types a plain Result)
    return result.rowcount
