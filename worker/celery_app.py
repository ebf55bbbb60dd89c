"""The Celery application. Messages carry only a job id (JSON); the SQL row is the truth about the job.

`celery -A worker.celery_app worker` (or `attrib worker`) runs it against ``ATTRIB_BROKER_URL``. Workers use the
prefork pool (one child process per worker by default): the parent enforces the time limits, survives a
child killed by the hard limit or the kernel's OOM killer, and starts a fresh child.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task, group, signals
from celery.exceptions import TimeLimitExceeded

from service.settings import Settings, get_settings
from worker import sqlite_broker

RUN_JOB_TASK = "attrib.run_job"
RUN_SHARD_TASK = "attrib.run_shard"
MERGE_TASK = "attrib.merge_job"

sqlite_broker.register()

log = logging.getLogger(__name__)


def create_celery_app(broker_url: str, queue_prefix: str | None = None, settings: Settings | None = None) -> Celery:
    """The app of a broker. Jobs are published to a named queue (`service.queue.QUEUE_OF_KIND`); the default queue
    is the prefixed ``gpu`` queue."""
    settings = settings or get_settings()
    prefix = settings.queue_prefix if queue_prefix is None else queue_prefix
    app = Celery("attrib", broker=broker_url)
    app.conf.update(
        task_default_queue=f"{prefix}gpu",
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options=_transport_options(broker_url, settings),
        task_soft_time_limit=settings.job_soft_time_limit_seconds,
        task_time_limit=settings.job_time_limit_seconds,
    )
    app.task(name=RUN_JOB_TASK, ignore_result=True, base=JobTask)(_job_runner(app))
    app.task(
        name=RUN_SHARD_TASK,
        ignore_result=True,
        base=ShardTask,
        soft_time_limit=settings.shard_soft_time_limit_seconds,
        time_limit=settings.shard_time_limit_seconds,
    )(_run_shard)
    app.task(name=MERGE_TASK, ignore_result=True, base=JobTask)(_merge_job)
    return app


def send_shards(app: Celery, job_id: str, shards: list[int]) -> None:
    """One message per shard of a sharded job, sent as a Celery group to the app's queue."""
    group(app.signature(RUN_SHARD_TASK, args=[job_id, shard]) for shard in shards).apply_async()


def send_merge(app: Celery, queue_prefix: str, job_id: str, attempt: int) -> None:
    """The merge of a sharded job's outputs, to the ``cpu`` queue (`worker.merge_runner`)."""
    from service.queue import QUEUE_OF_STEP

    app.send_task(MERGE_TASK, args=[job_id, attempt], queue=f"{queue_prefix}{QUEUE_OF_STEP['merge']}")


def consumes(app: Celery, queue_prefix: str, queue: str) -> bool:
    """Whether this worker consumes ``queue`` (its ``--queues``; without it, Celery's default queue, ``gpu``)."""
    return f"{queue_prefix}{queue}" in {q.name for q in app.amqp.queues.consume_from.values()}


def _transport_options(broker_url: str, settings: Settings) -> dict[str, Any]:
    """Redis redelivers a message not acknowledged within the visibility timeout: above the longest job, so that
    a running job's message is never handed to a second worker; its workers block on the queue and get a message
    at once. kombu's SQLAlchemy transport (the embedded default) has no such timeout and is polled: every
    ``broker_polling_seconds`` (see worker/sqlite_broker.py) instead of kombu's 1 s."""
    scheme = broker_url.split(":", 1)[0]
    if scheme in ("redis", "rediss", "sentinel"):
        return {"visibility_timeout": settings.broker_visibility_timeout_seconds}
    if scheme.startswith("sqla+"):
        return {"polling_interval": settings.broker_polling_seconds}
    return {}


class JobTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Called in the parent process when the hard time limit killed the child running the job."""
        if isinstance(exc, TimeLimitExceeded) and args:
            fail_timed_out(str(args[0]), get_settings())


class ShardTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Called in the parent process when the hard time limit killed the child running a shard: the shard
        fails, and with it its job (its coordinator sees the failed shard)."""
        if isinstance(exc, TimeLimitExceeded) and len(args) == 2:
            fail_shard_timed_out(str(args[0]), int(args[1]), get_settings())


def fail_shard_timed_out(job_id: str, shard: int, settings: Settings) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from service.liveness import time_limit_problem
    from worker.shard_rows import fail_shard

    engine = create_engine(settings.resolved_database_url, poolclass=NullPool)
    try:
        with Session(engine) as session, session.begin():
            fail_shard(session, job_id, shard, None, time_limit_problem(settings.shard_time_limit_seconds))
    except Exception:  # the coordinator reclaims the shard once its heartbeat is stale
        log.exception("could not fail job %s shard %d after its hard time limit", job_id, shard)
    finally:
        engine.dispose()


def fail_timed_out(job_id: str, settings: Settings) -> None:
    """Fail the job with a 'time limit' problem. This runs in the pool's parent process, which forks the children
    that run jobs: it uses a connection of its own, closed at once, so that no child inherits it."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from service.liveness import fail_running, time_limit_problem

    engine = create_engine(settings.resolved_database_url, poolclass=NullPool)
    try:
        with Session(engine) as session, session.begin():
            fail_running(session, job_id, time_limit_problem(settings.job_time_limit_seconds))
    except Exception:  # the reaper fails it later from its stale heartbeat
        log.exception("could not fail job %s after its hard time limit", job_id)
    finally:
        engine.dispose()


@signals.worker_process_init.connect(weak=False)
def _choose_the_device(**_: Any) -> None:
    """Each pool process picks its device (`worker.devices`) when it starts: after the fork, so CUDA is only ever
    initialised in the processes that run jobs, never in the worker's parent process."""
    from worker.devices import start_pool_process

    settings = get_settings()
    start_pool_process(settings.device, settings.torch_threads)


@signals.worker_ready.connect(weak=False)
def _say_ready(sender: Any = None, **_: Any) -> None:
    """One line an operator (and the topology test) can look for: which queues this worker consumes."""
    queues = sorted(queue.name for queue in sender.app.amqp.queues.consume_from.values()) if sender else []
    concurrency = getattr(getattr(sender, "controller", None), "concurrency", "?")
    log.warning("attrib worker ready: queues %s, concurrency %s", ",".join(queues), concurrency)


@signals.worker_init.connect(weak=False)
def _import_the_runner(**_: Any) -> None:
    """Import the job runner and its tasks (and torch: seconds on a busy machine) in the worker's main process,
    before the pool forks: every pool process, including one started after the previous was killed, starts at
    once with them loaded (a slow start would exceed Celery's wait for a new pool process), and no job's time
    limit is spent importing."""
    from worker.runner import TASKS, task_for

    for kind in TASKS:
        task_for(kind)
    # the shard and merge tasks' code, loaded before the fork as well
    import worker.merge_runner
    import worker.shard_runner  # noqa: F401


def _job_runner(app: Celery) -> Any:
    def _run_job(job_id: str) -> None:
        from worker.runner import run_job

        settings = get_settings()
        prefix = settings.queue_prefix
        merge_elsewhere = not consumes(app, prefix, "cpu")  # a gpu-only worker hands its merges to the cpu queue
        run_job(
            job_id,
            settings,
            send_shards=lambda job, shards: send_shards(app, job, shards),
            send_merge=(lambda job, attempt: send_merge(app, prefix, job, attempt)) if merge_elsewhere else None,
        )

    return _run_job


def _merge_job(job_id: str, attempt: int) -> None:
    from worker.merge_runner import run_merge

    run_merge(job_id, int(attempt), get_settings())


def _run_shard(job_id: str, shard: int) -> None:
    from worker.shard_runner import run_shard

    run_shard(job_id, shard, get_settings())


def run_reaper_in_pool_processes(app: Celery) -> None:
    """Each process that runs jobs also runs the reaper (`service.reaper`) in a thread, so that a deployment
    with only workers running still recovers lost jobs. Started in the pool's children, after the fork."""
    state: dict[str, Any] = {}

    def start(**_: Any) -> None:
        from service.queue import CeleryQueue
        from service.reaper import start_reaper

        settings = get_settings()
        queue = CeleryQueue(app.conf.broker_url, settings.queue_prefix)
        state["reaper"] = start_reaper(settings, queue)

    def stop(**_: Any) -> None:
        if (reaper := state.pop("reaper", None)) is not None:
            reaper.stop()

    signals.worker_process_init.connect(start, weak=False)
    signals.worker_process_shutdown.connect(stop, weak=False)


app = create_celery_app(get_settings().resolved_broker_url)
