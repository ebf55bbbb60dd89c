"""kombu's SQLAlchemy transport (the embedded default's broker: ``sqla+sqlite://``), polled often enough that a
job starts within a fraction of a second.

SQLite can tell no other process that a row arrived, so a worker finds new messages by polling; kombu polls once
a second by default. kombu's virtual transports take a ``polling_interval`` transport option, but its SQLAlchemy
channel hands every transport option on to ``create_engine``, which refuses that one. This channel leaves the
options that belong to the transport out of the engine's arguments, and ``register`` makes this transport the one
behind the ``sqla`` URL prefix in this process (the API and the workers both import it with the Celery app).
A poll is one indexed read of a small table: ten a second cost nothing noticeable.

kombu creates its tables, and a queue's row, the first time a process publishes to the queue or polls it, under
a lock that only covers its own process: when the API's first publish and the worker's first poll meet, one of
them creates what the other just created, and kombu lets that error escape (an ``IntegrityError`` from a poll
ends the worker). This channel takes what the other process made instead, and `declare_queues` creates the
tables and rows before any process races for them (`attrib serve` calls it before it starts its worker).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kombu import Connection
from kombu import transport as kombu_transports
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError, OperationalError

# Transport options that are not arguments of create_engine (kombu's own list, and the polling interval).
NOT_ENGINE_OPTIONS = frozenset(
    {
        "queue_tablename",
        "message_tablename",
        "callback",
        "errback",
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_errors",
        "polling_interval",
    }
)


class Channel(kombu_sqlalchemy.Channel):
    def _engine_from_config(self) -> Any:
        client = self.connection.client
        options = {name: value for name, value in client.transport_options.items() if name not in NOT_ENGINE_OPTIONS}
        return create_engine(client.hostname, **options)

    def _open(self) -> Any:
        """The engine and session factory, creating the tables if missing. kombu checks and creates its tables one
        at a time, so another process creating them at the same moment can make a try fail with "table ... already
        exists" once per table; each such failure means one more table exists, so a try per table and one more
        always end with all of them found."""
        tries = len(kombu_sqlalchemy.metadata.tables) + 1
        for _ in range(tries - 1):
            try:
                return super()._open()
            except OperationalError as exc:
                if "already exists" not in str(exc):
                    raise
        return super()._open()

    def _get_or_create(self, queue: str) -> Any:
        """The queue's row, made if missing; another process making it at the same moment is no error."""
        try:
            return super()._get_or_create(queue)
        except IntegrityError:  # the other process committed the row between our read and our insert
            self.session.rollback()
            return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).one()


class Transport(kombu_sqlalchemy.Transport):
    Channel = Channel


def declare_queues(broker_url: str, queues: Iterable[str]) -> None:
    """Create the broker's tables and the rows of these queues now, before several processes use them."""
    register()
    with Connection(broker_url) as connection:
        channel = connection.default_channel
        for queue in queues:
            channel.queue_declare(queue=queue)


def register() -> None:
    """Serve ``sqla+...`` broker URLs with this transport in this process."""
    kombu_transports.TRANSPORT_ALIASES["sqla"] = f"{__name__}:Transport"
    kombu_transports._transport_cache.pop("sqla", None)
