"""Alembic: upgrade from an empty database, and no drift between the tables and the migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import service.db.tables  # noqa: F401
from service.db.base import Base
from service.db.migrate import upgrade_to_head


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
