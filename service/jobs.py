"""Job rows: creation, their public shape, and cancellation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from service.conversions import from_row
from service.db.base import new_id, utcnow
from service.db.tables import FINISHED_STATUSES, Job, JobStatus
from service.job_links import job_links
from service.liveness import LivenessPolicy, cancel
from service.problems import ProblemError, problem_dict
from service.quotas import check_active_jobs
from service.schemas.jobs import JobOut, JobProgress

if TYPE_CHECKING:
    from service.queue import JobQueue


def create_job(session: Session, tenant_id: str, kind: str, max_active_jobs: int) -> Job:
    """A queued job row; 429 when the tenant already has ``max_active_jobs`` queued or running."""
    check_active_jobs(session, tenant_id, max_active_jobs)
    now = utcnow()
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        kind=kind,
        status="queued",
        progress_stage="queued",
        created_at=now,
        enqueued_at=now,
    )
    session.add(job)
    session.flush()
    return job


def job_out(session: Session, job: Job) -> JobOut:
    """The job with its progress and the resources its kind links to (`service.job_links`)."""
    links = job_links(session, job)
    progress = JobProgress(stage=job.progress_stage, completed=job.progress_completed, total=job.progress_total)
    return from_row(
        JobOut,
        job,
        progress=progress,
        result_url=links.result_url,
        fit_id=links.fit_id,
        attribution_id=links.attribution_id,
        model_id=links.model_id,
    )


def cancel_job(session: Session, job: Job, policy: LivenessPolicy) -> None:
    """Queued jobs, and running ones whose worker is gone, stop at once; running ones with a live worker stop at
    their next progress report."""
    if job.status in FINISHED_STATUSES:
        raise ProblemError(409, f"job {job.id!r} has already finished ({job.status})", kind="conflict")
    cancel(session, job, policy)


def job_status(session: Session, job_id: str) -> JobStatus:
    job = session.get(Job, job_id)
    return job.status if job is not None else "failed"


def enqueue_or_fail(session: Session, queue: JobQueue, job: Job) -> None:
    """Publish a committed job (never before its commit: the ``jobs`` table is the outbox, see `service.queue`).
    If the broker refuses, the job is failed and the caller gets a 503; if the process dies first, the job stays
    queued and the reaper publishes it."""
    try:
        queue.enqueue(job.id, job.kind)
    except Exception as exc:
        job.status, job.finished_at = "failed", utcnow()
        job.error = problem_dict(503, f"the job could not be queued: {exc}", kind="broker-unavailable")
        session.commit()
        raise ProblemError(
            503, "the job queue is unavailable; the job was not queued, try again later", kind="broker-unavailable"
        ) from exc
