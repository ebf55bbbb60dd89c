"""The Celery application. Messages carry only a job id (JSON); the SQL row is the truth about the job.

`celery -A worker.celery_app worker` (or `attrib worker`) runs it against ``ATTRIB_BROKER_URL``.
"""

from __future__ import annotations

from celery import Celery

from service.settings import get_settings

RUN_JOB_TASK = "attrib.run_job"


def create_celery_app(broker_url: str, queue_name: str = "attrib") -> Celery:
    app = Celery("attrib", broker=broker_url)
    app.conf.update(
        task_default_queue=queue_name,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=RUN_JOB_TASK, ignore_result=True)(_run_job)
    return app


def _run_job(job_id: str) -> None:
    from worker.runner import run_job

    run_job(job_id, get_settings())


app = create_celery_app(get_settings().resolved_broker_url)
