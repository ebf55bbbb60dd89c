"""The reaper: puts right the jobs that lost their worker or their broker message.

One pass (`reap`) looks at two kinds of job:

- ``running`` jobs whose heartbeat is stale (their worker died): each is requeued and sent to the broker again,
  or ends ``cancelled`` if a cancel was requested, or ``failed`` if it has used up its attempts or ran into its
  time limit;
- ``queued`` jobs that no worker claimed for ``requeue_seconds``: when the broker's queues are empty their message
  was lost (a broker restarted without persistence, or the API died between committing the job and publishing
  it: the ``jobs`` table is the outbox and this pass its relay, see `service.queue`), so they are sent again. A duplicate message is harmless: a
  claim drops a message for a job that is running or finished.

Every change is a conditional update (`service.liveness`), so passes running at the same time in several
processes (the API and each worker run one in a background thread) never act twice on one job. The reaper lives
in the service because it needs only the job rows and the app's `JobQueue`, never the worker's task code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, select

from service.db.base import utcnow
from service.db.session import session_scope
from service.db.tables import Job
from service.liveness import (
    LivenessPolicy,
    as_utc,
    ended,
    stale_clause,
    time_limit_problem,
    transition,
    worker_lost_problem,
)
from service.queue import JobQueue
from service.settings import Settings

log = logging.getLogger(__name__)

BATCH = 100


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)  # stale running -> queued, sent again
    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)  # queued, message presumed lost, sent again


def reap(database_url: str, queue: JobQueue, policy: LivenessPolicy) -> ReapReport:
    """One pass over stale running jobs and unclaimed queued ones; safe to run in several processes at once."""
    report = ReapReport()
    kinds = _settle_stale_running(database_url, policy, report)
    _send(queue, report.requeued, kinds)
    _resend_unclaimed(database_url, queue, policy, report)
    return report


def _settle_stale_running(database_url: str, policy: LivenessPolicy, report: ReapReport) -> dict[str, str]:
    """Settle the stale running jobs; returns the kind of each (its queue) by id."""
    now = utcnow()
    kinds: dict[str, str] = {}
    with session_scope(database_url) as session:
        stale = session.scalars(select(Job).where(Job.status == "running", stale_clause(policy, now)).limit(BATCH))
        for job in list(stale):
            kinds[job.id] = job.kind
            outcome, values = _fate_of_stale(job, policy, now)
            expected = [Job.status == "running", Job.attempts == job.attempts, stale_clause(policy, now)]
            if transition(session, job.id, expected, **values):
                getattr(report, outcome).append(job.id)
    for outcome in ("requeued", "cancelled", "failed"):
        if ids := getattr(report, outcome):
            log.warning("reaper: %s %d job(s) whose worker stopped sending heartbeats: %s", outcome, len(ids), ids)
    return kinds


def _fate_of_stale(job: Job, policy: LivenessPolicy, now: datetime) -> tuple[str, dict[str, Any]]:
    """What becomes of a running job whose worker is gone: the report's list it goes to, and its new values."""
    if job.cancel_requested:
        return "cancelled", ended("cancelled", now)
    if _ran_past_time_limit(job, policy):
        return "failed", ended("failed", now, time_limit_problem(policy.soft_time_limit_seconds))
    if job.attempts >= policy.max_attempts:
        return "failed", ended("failed", now, worker_lost_problem(job.attempts, policy))
    return "requeued", {"status": "queued", "progress_stage": "queued", "enqueued_at": now}


def _ran_past_time_limit(job: Job, policy: LivenessPolicy) -> bool:
    if job.started_at is None or job.heartbeat_at is None:
        return False
    ran = as_utc(job.heartbeat_at) - as_utc(job.started_at)
    return ran >= timedelta(seconds=policy.soft_time_limit_seconds)


def _resend_unclaimed(database_url: str, queue: JobQueue, policy: LivenessPolicy, report: ReapReport) -> None:
    now = utcnow()
    unclaimed = _unclaimed_since(now - timedelta(seconds=policy.requeue_seconds))
    with session_scope(database_url) as session:
        kinds = {
            job_id: kind
            for job_id, kind in session.execute(
                select(Job.id, Job.kind).where(Job.status == "queued", unclaimed).limit(BATCH)
            )
        }
    candidates = list(kinds)
    if not candidates:
        return
    try:
        waiting = queue.backlog()
    except Exception as exc:  # noqa: BLE001  (broker down: nothing can be sent now; the next pass tries again)
        log.warning("reaper: the broker is unreachable (%s); queued jobs are not resent now", exc)
        return
    if waiting > 0:  # workers are still draining the queue: the messages are probably there
        return
    with session_scope(database_url) as session:
        for job_id in candidates:
            if transition(session, job_id, [Job.status == "queued", unclaimed], enqueued_at=now):
                report.resent.append(job_id)
    if report.resent:
        log.warning(
            "reaper: resent %d queued job(s) no worker claimed within %g s: %s",
            len(report.resent),
            policy.requeue_seconds,
            report.resent,
        )
    _send(queue, report.resent, kinds)


def _unclaimed_since(cutoff: datetime) -> ColumnElement[bool]:
    return or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff)


def _send(queue: JobQueue, job_ids: list[str], kinds: Mapping[str, str]) -> None:
    """A failed send leaves the job queued: a later pass resends it once ``requeue_seconds`` have passed."""
    for job_id in job_ids:
        try:
            queue.enqueue(job_id, kinds[job_id])
        except Exception as exc:  # noqa: BLE001
            log.warning("reaper: could not send job %s to the broker (%s); it will be resent later", job_id, exc)


class ReaperThread:
    """Runs `reap` every ``period`` seconds in a daemon thread until stopped."""

    def __init__(self, database_url: str, queue: JobQueue, policy: LivenessPolicy, period: float) -> None:
        self.database_url, self.queue, self.policy, self.period = database_url, queue, policy, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attrib-reaper", daemon=True)

    def start(self) -> ReaperThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reap(self.database_url, self.queue, self.policy)
            except Exception:  # a database hiccup must not end the thread
                log.exception("reaper: pass failed; retrying in %g s", self.period)
            self._stop.wait(self.period)


def start_reaper(settings: Settings, queue: JobQueue) -> ReaperThread | None:
    """The reaper thread for a process (API or worker), unless ``ATTRIB_JOB_REAPER_SECONDS`` is 0."""
    if settings.job_reaper_seconds <= 0:
        return None
    policy = LivenessPolicy.from_settings(settings)
    return ReaperThread(settings.resolved_database_url, queue, policy, settings.job_reaper_seconds).start()
