"""Jobs: status with progress, listing, cancellation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from service.db.tables import Job
from service.dependencies import SessionDep, SettingsDep, TenantDep
from service.jobs import cancel_job, job_out
from service.liveness import LivenessPolicy
from service.ownership import owned
from service.pagination import PageTokenQuery, clamp_page_size, page_newest_first
from service.problems import problem_responses
from service.schemas.jobs import JobList, JobOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problem_responses(400, 401, 404, 422))


@router.get("", summary="List jobs")
def list_jobs(
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    page_size: Annotated[int, Query(ge=1)] = 50,
    page_token: PageTokenQuery = None,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
) -> JobList:
    """The tenant's jobs, newest first, cursor-paged (`next_page_token`); `status` keeps one state."""
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        query = query.where(Job.status == status)
    rows, token = page_newest_first(session, query, Job, clamp_page_size(page_size, settings.max_page_size), page_token)
    return JobList(jobs=[job_out(session, job) for job in rows], next_page_token=token)


@router.get("/{job_id}", summary="Get a job")
def get_job(job_id: str, tenant: TenantDep, session: SessionDep) -> JobOut:
    """A job's status and progress; poll it after a 202 (its `Location`). A succeeded job has `result_url`, a
    failed one a problem document in `error`."""
    return job_out(session, owned(session, Job, tenant.id, job_id))


@router.post("/{job_id}/cancel", responses=problem_responses(409), summary="Cancel a job", name="cancel_job")
def cancel(job_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> JobOut:
    """A queued job, or a running one whose worker is gone (stale heartbeat), ends `cancelled` at once; a running
    job with a live worker stops at its next progress report."""
    job = owned(session, Job, tenant.id, job_id)
    cancel_job(session, job, LivenessPolicy.from_settings(settings))
    return job_out(session, job)
