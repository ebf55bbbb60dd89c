"""How the API hands a job to the workers. Messages carry only the job id; the SQL row is the truth."""

from __future__ import annotations

from typing import Protocol


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...

    def ready(self) -> bool: ...

    def backlog(self) -> int:
        """Messages waiting in the broker's queue (not those a worker holds); raises if the broker is down."""
        ...


class CeleryQueue:
    """Production and embedded default: a Celery broker (Redis, or SQLite through kombu's SQLAlchemy transport)."""

    def __init__(self, broker_url: str, queue_name: str = "attrib") -> None:
        from worker.celery_app import create_celery_app

        self.app = create_celery_app(broker_url, queue_name)
        self.queue_name = queue_name

    def enqueue(self, job_id: str) -> None:
        from worker.celery_app import RUN_JOB_TASK

        self.app.send_task(RUN_JOB_TASK, args=[job_id])

    def ready(self) -> bool:
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:  # noqa: BLE001  (any broker failure means "not ready")
            return False

    def backlog(self) -> int:
        from kombu.exceptions import ChannelError

        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            try:
                declared = connection.default_channel.queue_declare(queue=self.queue_name, passive=True)
            except ChannelError:  # Redis keeps no empty lists: a queue that does not exist holds nothing
                return 0
            return int(declared.message_count)
