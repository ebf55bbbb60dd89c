"""The embedded default's broker (kombu's SQLAlchemy transport on SQLite) is polled every
``broker_polling_seconds``, and still carries messages."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings
from worker.celery_app import create_celery_app
from worker.sqlite_broker import Transport


def test_the_embedded_broker_polls_at_the_configured_interval_and_carries_messages(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_polling_seconds=0.05)
    app = create_celery_app(settings.resolved_broker_url, settings=settings)
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
        assert connection.transport.polling_interval == 0.05
        queue = connection.SimpleQueue("latency-test")
        queue.put({"job_id": "job_1"})
        message = queue.get(timeout=5)
        assert message.payload == {"job_id": "job_1"}
        message.ack()
        queue.close()


def test_the_polling_interval_defaults_below_a_second(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).broker_polling_seconds < 1
