"""Shared test helpers: real PostgreSQL and Redis on 127.0.0.1, which must be up under CI=true."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

POSTGRES_URL = os.environ.get("ATTRIB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ATTRIB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, port: int) -> None:
    """Skip locally when a server is down; under CI=true that is a failure, never a skip."""
    if port_open("127.0.0.1", port):
        return
    message = f"{name} is not reachable on 127.0.0.1:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the real server is required)")
    pytest.skip(message)


@contextmanager
def private_postgres_schema(prefix: str = "attrib_test") -> Iterator[str]:
    """A schema of its own in the real `test` database (its URL), dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
