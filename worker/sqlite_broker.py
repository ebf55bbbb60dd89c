"""kombu's SQLAlchemy transport (the embedded default's broker: ``sqla+sqlite://``), polled often enough that a
job starts within a fraction of a second.

SQLite can tell no other process that a row arrived, so a worker finds new messages by polling; kombu polls once
a second by default. kombu's virtual transports take a ``polling_interval`` transport option, but its SQLAlchemy
channel hands every transport option on to ``create_engine``, which refuses that one. This channel leaves the
options that belong to the transport out of the engine's arguments, and ``register`` makes this transport the one
behind the ``sqla`` URL prefix in this process (the API and the workers both import it with the Celery app).
A poll is one indexed read of a small table: ten a second cost nothing noticeable.
"""

from __future__ import annotations

from typing import Any

from kombu import transport as kombu_transports
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import create_engine

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


class Transport(kombu_sqlalchemy.Transport):
    Channel = Channel


def register() -> None:
    """Serve ``sqla+...`` broker URLs with this transport in this process."""
    kombu_transports.TRANSPORT_ALIASES["sqla"] = f"{__name__}:Transport"
    kombu_transports._transport_cache.pop("sqla", None)
