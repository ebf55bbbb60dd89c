"""What a job made, by job kind: the resources a job response links to. One function per kind, in one table
(the worker's `JOB_KINDS` holds how each kind runs; this holds what its response shows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Attribution, Edit, Fit, Job


@dataclass(frozen=True)
class JobLinks:
    """The resources a job is about; ``result_url`` once it has succeeded."""

    fit_id: str | None = None
    attribution_id: str | None = None
    model_id: str | None = None
    result_url: str | None = None


def fit_links(session: Session, job: Job) -> JobLinks:
    fit_id = session.scalar(select(Fit.id).where(Fit.job_id == job.id))
    done = fit_id is not None and job.status == "succeeded"
    return JobLinks(fit_id=fit_id, result_url=f"/v1/fits/{fit_id}" if done else None)


def attribution_links(session: Session, job: Job) -> JobLinks:
    attribution_id = session.scalar(select(Attribution.id).where(Attribution.job_id == job.id))
    done = attribution_id is not None and job.status == "succeeded"
    return JobLinks(
        attribution_id=attribution_id, result_url=f"/v1/attributions/{attribution_id}/results" if done else None
    )


def edit_links(session: Session, job: Job) -> JobLinks:
    edit = session.scalar(select(Edit).where(Edit.job_id == job.id))
    if edit is None:
        return JobLinks()
    done = job.status == "succeeded"
    return JobLinks(
        attribution_id=edit.attribution_id,
        model_id=edit.model_id,
        result_url=f"/v1/models/{edit.model_id}" if done else None,
    )


JOB_LINKS: dict[str, Callable[[Session, Job], JobLinks]] = {
    "fit": fit_links,
    "attribution": attribution_links,
    "edit": edit_links,
}


def job_links(session: Session, job: Job) -> JobLinks:
    """The links of ``job``'s kind (none for a kind this release does not know)."""
    links = JOB_LINKS.get(job.kind)
    return links(session, job) if links is not None else JobLinks()
