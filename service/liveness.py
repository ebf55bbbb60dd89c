"""Job liveness: the state changes that keep a job from being lost, run twice, or left `running` forever.

Each change is one conditional UPDATE whose WHERE clause states what the writer believes the row to be; when
two processes race (two workers handed the same message, a worker and the reaper, the reaper in two
processes), exactly one of them matches and the others change nothing. ``attempts`` counts the claims of a
job and fences its writers: a worker writes only while the row is ``running`` under its own attempt number,
so a worker that was presumed dead cannot overwrite the job once another attempt replaced it.

A running job is *stale* when its heartbeat is older than ``stale_seconds``: its worker is gone (killed, out of
memory, its machine lost) or cut off from the database, and the job may be started again.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, update
from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.session import affected_rows
from service.db.tables import FINISHED_STATUSES, Job
from service.problems import problem_dict
from service.settings import Settings

WORKER_LOST = "worker-lost"
TIME_LIMIT = "time-limit"


@dataclass(frozen=True)
class LivenessPolicy:
    heartbeat_seconds: float
    stale_seconds: float
    max_attempts: int
    requeue_seconds: float
    soft_time_limit_seconds: float
    time_limit_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> LivenessPolicy:
        return cls(
            heartbeat_seconds=settings.job_heartbeat_seconds,
            stale_seconds=settings.job_stale_seconds,
            max_attempts=settings.job_max_attempts,
            requeue_seconds=settings.job_requeue_seconds,
            soft_time_limit_seconds=settings.job_soft_time_limit_seconds,
            time_limit_seconds=settings.job_time_limit_seconds,
        )

    def stale_before(self, now: datetime) -> datetime:
        return now - timedelta(seconds=self.stale_seconds)

    def is_stale(self, heartbeat_at: datetime | None, now: datetime) -> bool:
        return heartbeat_at is None or as_utc(heartbeat_at) < self.stale_before(now)


class Superseded(Exception):
    """This attempt no longer owns its job (it was presumed dead and the job was requeued, cancelled or failed)."""


class CancelRequested(Exception):
    """The job's cancel was requested: the attempt stops and the job ends ``cancelled``."""


def as_utc(moment: datetime) -> datetime:
    """Timestamps read back from SQLite carry no zone; every timestamp we write is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_lost_problem(attempts: int, policy: LivenessPolicy) -> dict[str, Any]:
    return problem_dict(
        500,
        f"the job's worker died {attempts} times while running it (no heartbeat for {policy.stale_seconds:g} s "
        "each time: killed, out of memory, or its machine was lost); it is not started again",
        kind=WORKER_LOST,
        title="Job failed",
    )


def time_limit_problem(seconds: float) -> dict[str, Any]:
    return problem_dict(
        422,
        f"the job exceeded its time limit of {seconds:g} s and was stopped (ATTRIB_JOB_SOFT_TIME_LIMIT_SECONDS "
        "and ATTRIB_JOB_TIME_LIMIT_SECONDS); try a cheaper method or option, or a smaller dataset",
        kind=TIME_LIMIT,
        title="Job failed",
    )


def transition(session: Session, job_id: str, expected: list[ColumnElement[bool]], **values: Any) -> bool:
    """UPDATE the job only if it still matches ``expected``; True when this caller made the change."""
    statement = update(Job).where(Job.id == job_id, *expected).values(**values)
    return affected_rows(session, statement.execution_options(synchronize_session=False)) == 1


def _as_observed(job: Job, policy: LivenessPolicy, now: datetime) -> list[ColumnElement[bool]]:
    """The row is still what we read: same status and attempt, and still stale if it was running."""
    expected = [Job.status == job.status, Job.attempts == job.attempts]
    if job.status == "running":
        expected.append(stale_clause(policy, now))
    return expected


def stale_clause(policy: LivenessPolicy, now: datetime) -> ColumnElement[bool]:
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < policy.stale_before(now))


def ended(status: str, now: datetime, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The values of a job that ends (its progress stays where the work stopped)."""
    return {"status": status, "finished_at": now, "error": error}


def claim(session: Session, job_id: str, policy: LivenessPolicy, worker: str) -> int | None:
    """Start a new attempt of the job and return its number, or None when this message must be dropped:
    the job is finished, runs under a live worker, was cancelled, or has used up its attempts."""
    job = session.get(Job, job_id)
    now = utcnow()
    if job is None or job.status in FINISHED_STATUSES:
        return None
    if job.status == "running" and not policy.is_stale(job.heartbeat_at, now):
        return None
    expected = _as_observed(job, policy, now)
    if job.cancel_requested:
        transition(session, job_id, expected, **ended("cancelled", now))
        return None
    if job.attempts >= policy.max_attempts:
        transition(session, job_id, expected, **ended("failed", now, worker_lost_problem(job.attempts, policy)))
        return None
    won = transition(
        session,
        job_id,
        expected,
        status="running",
        attempts=job.attempts + 1,
        started_at=now,
        heartbeat_at=now,
        claimed_by=worker,
        progress_stage="starting",
        progress_completed=0,
        progress_total=0,
    )
    return job.attempts + 1 if won else None


def _owned(job_id: str, attempt: int) -> list[ColumnElement[bool]]:
    return [Job.status == "running", Job.attempts == attempt]


def beat(session: Session, job_id: str, attempt: int) -> bool:
    """Write the heartbeat of a running attempt; False when the attempt no longer owns the job."""
    return transition(session, job_id, _owned(job_id, attempt), heartbeat_at=utcnow())


def report_progress(session: Session, job_id: str, attempt: int, stage: str, completed: int, total: int) -> None:
    """Write progress (and a heartbeat); raises ``CancelRequested`` or ``Superseded`` when the work must stop."""
    written = transition(
        session,
        job_id,
        [*_owned(job_id, attempt), Job.cancel_requested.is_(False)],
        progress_stage=stage,
        progress_completed=completed,
        progress_total=total,
        heartbeat_at=utcnow(),
    )
    if not written:
        raise _why_not_owned(session, job_id, attempt)


def finish(
    session: Session,
    job_id: str,
    attempt: int,
    status: str,
    error: dict[str, Any] | None = None,
    progress_total: int = 0,
) -> None:
    """End the attempt's job with ``status`` in the caller's transaction, or raise (and let it roll back) if the
    attempt no longer owns the job — or, for ``succeeded``, if a cancel was requested meanwhile."""
    expected = _owned(job_id, attempt)
    values = ended(status, utcnow(), error)
    if status == "succeeded":
        expected.append(Job.cancel_requested.is_(False))
        done = max(progress_total, 1)
        values.update(progress_stage="done", progress_completed=done, progress_total=done)
    if not transition(session, job_id, expected, **values):
        raise _why_not_owned(session, job_id, attempt)


def _why_not_owned(session: Session, job_id: str, attempt: int) -> Exception:
    job = session.get(Job, job_id, populate_existing=True)
    if job is not None and job.status == "running" and job.attempts == attempt and job.cancel_requested:
        return CancelRequested(job_id)
    state = "gone" if job is None else f"{job.status}, attempt {job.attempts}"
    return Superseded(f"job {job_id} attempt {attempt} no longer owns the job ({state})")


def fail_running(session: Session, job_id: str, error: dict[str, Any]) -> bool:
    """Fail a running job whatever its attempt (its process was killed by the hard time limit)."""
    return transition(session, job_id, [Job.status == "running"], **ended("failed", utcnow(), error))


def cancel(session: Session, job: Job, policy: LivenessPolicy) -> None:
    """Ask a job to stop. A queued job, or a running one whose worker is gone, ends `cancelled` at once; a running
    job with a live worker stops at its next progress report."""
    for _ in range(3):  # the row may change under us (claimed, finished); decide again on what it became
        now = utcnow()
        if job.status in FINISHED_STATUSES:
            return
        ends_now = job.status == "queued" or policy.is_stale(job.heartbeat_at, now)
        values = {"cancel_requested": True, **(ended("cancelled", now) if ends_now else {})}
        expected = [Job.status == job.status, Job.attempts == job.attempts]
        if ends_now and job.status == "running":
            expected.append(stale_clause(policy, now))
        changed = transition(session, job.id, expected, **values)
        session.refresh(job)
        if changed:
            return
