"""Engines and sessions. One engine per database URL per process.

The API process sizes its engine's pool from its settings (``configure_engine``) before it serves a request, so
that every admitted request can hold a connection without waiting (see ``service/admission.py``); other processes
(workers, the CLI) get a small default pool on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event
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
    return create_engine(url, pool_pre_ping=True, **pool)


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


def affected_rows(session: Session, statement: Executable) -> int:
    """Runs an UPDATE or DELETE in ``session``; the number of rows it matched."""
    result = session.execute(statement)
    assert isinstance(result, CursorResult)  # what a DML statement answers (Session.execute types a plain Result)
    return result.rowcount
