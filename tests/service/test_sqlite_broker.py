"""The embedded default's broker (kombu's SQLAlchemy transport on SQLite) is polled every
``broker_polling_seconds``, and still carries messages."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from kombu import Connection
from sqlalchemy import create_engine, text

from service.settings import Settings
from worker.celery_app import create_celery_app
from worker.sqlite_broker import Transport, declare_queues, register

PROCESSES = 6  # first users of one new broker at once (the API, workers, a CLI)


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


def _first_use_of_the_broker(broker_url: str, barrier: Any, outcomes: Any) -> None:
    """One process's first contact with a new broker: open it (creating its tables) and poll the gpu queue."""
    register()
    try:
        with Connection(broker_url) as connection:
            channel = connection.default_channel
            barrier.wait(timeout=30)
            channel.queue_declare(queue="gpu")
            channel.basic_get("gpu")
        outcomes.put("ok")
    except Exception as exc:  # noqa: BLE001  (reported to the test, whatever it is)
        outcomes.put(f"{type(exc).__name__}: {exc}"[:300])


def test_processes_using_a_new_broker_at_once_never_fail_on_each_others_tables_and_queues(tmp_path: Path) -> None:
    """The API's first publish and the worker's first poll meet on a new data directory: both create the broker's
    tables and the queue's row; kombu alone lets one of them fail (and a failed poll ends the worker)."""
    context = multiprocessing.get_context("fork")
    outcomes: list[str] = []
    for round_ in range(12):
        broker_url = f"sqla+sqlite:///{tmp_path}/broker-{round_}.db"
        barrier, results = context.Barrier(PROCESSES), context.Queue()
        processes = [
            context.Process(target=_first_use_of_the_broker, args=(broker_url, barrier, results))
            for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        outcomes += [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=30)
    assert outcomes == ["ok"] * len(outcomes)


def test_declared_queues_exist_before_any_process_uses_them(tmp_path: Path) -> None:
    broker_url = f"sqla+sqlite:///{tmp_path}/broker.db"
    declare_queues(broker_url, ["gpu", "cpu"])
    engine = create_engine(broker_url.removeprefix("sqla+"))
    with engine.connect() as connection:
        names = {row[0] for row in connection.execute(text("SELECT name FROM kombu_queue"))}
    engine.dispose()
    assert names == {"gpu", "cpu"}
