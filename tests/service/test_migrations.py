"""Alembic: upgrade from an empty database, and no drift between the tables and the migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import service.db.tables  # noqa: F401
from service.db.base import Base
from service.db.migrate import upgrade_to_head
from tests.conftest import private_postgres_schema, require_server


def assert_no_drift(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"the models and the migrations differ: {diff}"
    assert set(Base.metadata.tables) <= tables


def test_sqlite_upgrade_from_empty_has_no_drift(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    upgrade_to_head(url)
    upgrade_to_head(url)  # idempotent
    assert_no_drift(url)


@pytest.mark.postgres
def test_postgres_upgrade_from_empty_has_no_drift(postgres_schema_url: str) -> None:
    upgrade_to_head(postgres_schema_url)
    assert_no_drift(postgres_schema_url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own: a SQLite file, or a fresh private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite'}"
        return
    require_server("PostgreSQL", 5432)
    with private_postgres_schema("attrib_migrate") as url:
        yield url


def test_0008_moves_result_rows_under_their_key_and_fills_the_query_rows(empty_database: str) -> None:
    """Rows written under 0007 (a plain and a per-token attribution) survive 0008 with their query rows and 0009 as
    chunks (one per query row and direction, and two where ranks skip one), page by query_id and query_token, and
    survive the downgrades back."""
    from alembic import command
    from sqlalchemy import text

    from service.db.migrate import alembic_config
    from service.db.session import session_scope
    from service.results import page_of_results

    config = alembic_config(empty_database)
    command.upgrade(config, "0007")
    columns = "attribution_id, direction, query_pos, query_id, rank, train_id, score, query_token, query_token_text"
    rows = [
        {"a": a, "d": d, "p": p, "q": q, "r": r, "t": str(100 * p + r), "s": float(-r), "k": k, "x": x}
        for a, per_token in (("attr_plain", False), ("attr_token", True))
        for d in ("positive", "negative")
        for p in range(4)
        for q, k, x in [(f"q{p // 2}", p % 2 + 1, f"w{p}") if per_token else (f"q{p}", None, None)]
        for r in (1, 2, 3, 4, 5, 7)  # rank 6 is missing: ranks 1-5 and 7 make two chunks
    ]
    engine = create_engine(empty_database)
    with engine.begin() as connection:
        connection.execute(
            text(f"INSERT INTO attribution_results ({columns}) VALUES (:a, :d, :p, :q, :r, :t, :s, :k, :x)"), rows
        )
    command.upgrade(config, "head")
    assert_no_drift(empty_database)
    with engine.connect() as connection:
        queries = connection.execute(
            text("SELECT attribution_id, query_pos, query_id, query_token FROM attribution_queries ORDER BY 1, 2")
        ).all()
        assert [tuple(row) for row in queries] == [
            *[("attr_plain", p, f"q{p}", None) for p in range(4)],
            *[("attr_token", p, f"q{p // 2}", p % 2 + 1) for p in range(4)],
        ]
        chunks = connection.execute(
            text(
                "SELECT attribution_id, direction, query_pos, first_rank, last_rank FROM result_chunks ORDER BY 1, 2, 3, 4"
            )
        ).all()
        assert [tuple(chunk) for chunk in chunks] == [
            (a, d, p, first, last)
            for a in ("attr_plain", "attr_token")
            for d in ("negative", "positive")
            for p in range(4)
            for first, last in ((1, 5), (7, 7))
        ]
    with session_scope(empty_database) as session:
        page, _ = page_of_results(session, "attr_token", "negative", None, None, 100, query_token=2)
        assert [(row.query_pos, row.rank, row.query_token_text) for row in page] == [
            (p, r, f"w{p}") for p in (1, 3) for r in (1, 2, 3, 4, 5, 7)
        ]
        page, _ = page_of_results(session, "attr_plain", "positive", "q2", None, 100)
        assert [(row.query_pos, row.rank, row.train_id, row.score) for row in page] == [
            (2, r, str(200 + r), float(-r)) for r in (1, 2, 3, 4, 5, 7)
        ]
    command.downgrade(config, "0007")
    with engine.connect() as connection:
        back = connection.execute(text(f"SELECT {columns} FROM attribution_results ORDER BY id")).all()
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert "attribution_queries" not in tables
    written = [
        (row["a"], row["d"], row["p"], row["q"], row["r"], row["t"], row["s"], row["k"], row["x"]) for row in rows
    ]
    assert sorted(tuple(row) for row in back) == sorted(written)
