"""How the API hands a job to the workers. Messages carry only the job id; the SQL row is the truth.

Jobs go to one of two queues by kind (`QUEUE_OF_KIND`): ``gpu`` for the work that runs models (fits, scoring,
edits, the shards of a sharded job) and ``cpu`` for work that does not (the merge of a sharded job's shards,
`QUEUE_OF_STEP`). `attrib worker --queues gpu` consumes one of
them. ``ATTRIB_QUEUE_PREFIX`` prefixes the broker's queue names, so that several deployments can share a broker.

Publishing happens after the job's row is committed, never before: the ``jobs`` table is the outbox. A job
committed but never published (the API died between the two, or the broker refused) stays ``queued``; the reaper
(`service.reaper`) is the relay that publishes it again once no worker claimed it in ``ATTRIB_JOB_REQUEUE_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from typing import Literal, Protocol

QueueName = Literal["gpu", "cpu"]
QUEUES: tuple[QueueName, ...] = ("gpu", "cpu")
QUEUE_OF_KIND: dict[str, QueueName] = {"fit": "gpu", "attribution": "gpu", "edit": "gpu"}
# The steps of a sharded job after its own task (docs/jobs.md, "Sharded jobs"): shards run models, the merge
# adds up their outputs. (The reaper is no task: a thread in the API and in each worker process.)
QUEUE_OF_STEP: dict[str, QueueName] = {"shard": "gpu", "merge": "cpu"}

log = logging.getLogger(__name__)


def queue_for(kind: str) -> QueueName:
    """The queue of a job kind; a kind missing from `QUEUE_OF_KIND` is a programming error."""
    try:
        return QUEUE_OF_KIND[kind]
    except KeyError:
        raise ValueError(f"no queue for job kind {kind!r}; add it to service.queue.QUEUE_OF_KIND") from None


def broker_queues(queues: Sequence[str], queue_prefix: str) -> str:
    """The value of Celery's ``--queues`` for queue names (``gpu``, ``cpu``) under a prefix."""
    return ",".join(f"{queue_prefix}{queue}" for queue in queues)


class JobQueue(Protocol):
    def enqueue(self, job_id: str, kind: str) -> None: ...

    def ready(self) -> bool: ...

    def backlog(self) -> int:
        """Messages waiting in the broker's queues (not those a worker holds); raises if the broker is down."""
        ...

    def backlogs(self) -> dict[str, int]:
        """`backlog` queue by queue (``gpu``, ``cpu``); raises if the broker is down."""
        ...


class CeleryQueue:
    """Production and embedded default: a Celery broker (Redis, or SQLite through kombu's SQLAlchemy transport)."""

    def __init__(self, broker_url: str, queue_prefix: str = "") -> None:
        from worker.celery_app import create_celery_app

        self.app = create_celery_app(broker_url, queue_prefix)
        self.queue_prefix = queue_prefix

    def broker_queue(self, queue: QueueName) -> str:
        return f"{self.queue_prefix}{queue}"

    def enqueue(self, job_id: str, kind: str) -> None:
        from worker.celery_app import RUN_JOB_TASK

        self.app.send_task(RUN_JOB_TASK, args=[job_id], queue=self.broker_queue(queue_for(kind)))

    def ready(self) -> bool:
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:  # noqa: BLE001  (any broker failure means "not ready")
            return False

    def backlog(self) -> int:
        return sum(self.backlogs().values())

    def backlogs(self) -> dict[str, int]:
        from kombu.exceptions import ChannelError

        counts: dict[str, int] = {}
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
            for queue in QUEUES:
                try:
                    declared = connection.default_channel.queue_declare(queue=self.broker_queue(queue), passive=True)
                    counts[queue] = int(declared.message_count)
                except ChannelError:  # Redis keeps no empty lists: a queue that does not exist holds nothing
                    counts[queue] = 0
        return counts


class KillBeforePublish:
    """Fault injection for tests (``ATTRIB_FAULT_KILL_BEFORE_PUBLISH``): the process SIGKILLs itself when it is
    about to publish a job, that is after the job's row was committed — the crash the outbox guarantee is about."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def enqueue(self, job_id: str, kind: str) -> None:
        log.critical(
            "ATTRIB_FAULT_KILL_BEFORE_PUBLISH: killing process %d before publishing job %s", os.getpid(), job_id
        )
        os.kill(os.getpid(), signal.SIGKILL)

    def ready(self) -> bool:
        return self.queue.ready()

    def backlog(self) -> int:
        return self.queue.backlog()

    def backlogs(self) -> dict[str, int]:
        return self.queue.backlogs()
