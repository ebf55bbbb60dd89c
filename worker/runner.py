"""Runs one job: claims its row, keeps its heartbeat, reports progress to it, calls the task for its kind, records
the outcome.

Results and the final status are written in one transaction, so a job never shows partial results. Every write
is fenced by the attempt number of the claim (see `service.liveness`): an attempt that was presumed dead and
replaced stops at its next progress report and can never write results or a status.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from service.db.session import session_scope
from service.db.tables import Job
from service.liveness import (
    CancelRequested, LivenessPolicy, Superseded, claim, finish, report_progress, time_limit_problem, worker_name,
)
from service.problems import problem_dict
from service.settings import Settings
from service.storage import BlobStore, LocalBlobStore
from worker.artifacts.errors import ArtifactError
from worker.attribution import AttributionError, Cancelled
from worker.devices import job_device
from worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 0.5

@dataclass
class JobContext:
    """What a task needs: where the database and blobs are, how to report progress, and how to finish."""

    job_id: str
    database_url: str
    store: BlobStore
    attempt: int = 1
    heartbeat: Heartbeat | None = None
    device_setting: str = "cpu"  # ATTRIB_DEVICE
    _last_write: float = field(default=0.0)
    _last_stage: str = field(default="")

    @property
    def device(self) -> torch.device:
        """The device of this process's jobs (`worker.devices`); a job on a worker whose ``ATTRIB_DEVICE`` names a
        GPU it lacks fails with that reason."""
        return job_device(self.device_setting)

    def session(self):  # type: ignore[no-untyped-def]
        return session_scope(self.database_url)

    def progress(self, stage: str, completed: int, total: int) -> None:
        """Write progress (throttled); stop the work with ``Cancelled`` if the job was cancelled, or with
        ``Superseded`` if this attempt no longer owns the job."""
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise Superseded(f"job {self.job_id} attempt {self.attempt} lost its job")
        now = time.monotonic()
        final = total > 0 and completed >= total
        if stage == self._last_stage and now - self._last_write < PROGRESS_WRITE_SECONDS and not final:
            return
        self._last_write, self._last_stage = now, stage
        with self.session() as session:
            try:
                report_progress(session, self.job_id, self.attempt, stage, completed, total)
            except CancelRequested:
                raise Cancelled() from None

    def succeed(self, session: Session) -> None:
        """Mark the job succeeded in ``session``'s transaction (with the results written in it); raises
        ``Cancelled`` or ``Superseded`` instead, and the caller's transaction rolls back, if the job was
        cancelled meanwhile or this attempt no longer owns it."""
        job = session.get(Job, self.job_id)
        try:
            finish(session, self.job_id, self.attempt, "succeeded",
                   progress_total=job.progress_total if job is not None else 0)
        except CancelRequested:
            raise Cancelled() from None


def store_for(settings: Settings) -> BlobStore:
    return LocalBlobStore(settings.resolved_storage_dir)


def run_job(job_id: str, settings: Settings) -> None:
    url = settings.resolved_database_url
    policy = LivenessPolicy.from_settings(settings)
    with session_scope(url) as session:
        attempt = claim(session, job_id, policy, worker_name())
    if attempt is None:
        log.info("job %s: message dropped (finished, running elsewhere, cancelled or out of attempts)", job_id)
        return
    with Heartbeat(url, job_id, attempt, policy.heartbeat_seconds) as heartbeat:
        context = JobContext(job_id=job_id, database_url=url, store=store_for(settings), attempt=attempt,
                             heartbeat=heartbeat, device_setting=settings.device)
        _run_and_record(context, policy)


def _run_and_record(context: JobContext, policy: LivenessPolicy) -> None:
    job_id = context.job_id
    try:
        _dispatch(context)
    except Superseded as exc:
        log.warning("job %s: %s; its work is dropped", job_id, exc)
    except Cancelled:
        _finish(context, "cancelled", None)
    except SoftTimeLimitExceeded:
        _finish(context, "failed", time_limit_problem(policy.soft_time_limit_seconds))
    except (AttributionError, ArtifactError) as exc:
        detail = exc.detail if isinstance(exc, ArtifactError) else str(exc)
        _finish(context, "failed", problem_dict(422, detail, kind="attribution-failed", title="Job failed"))
    except Exception as exc:  # noqa: BLE001  (the job must end failed, never stay running)
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        detail = f"the job failed unexpectedly ({type(exc).__name__}: {exc})"
        _finish(context, "failed", problem_dict(500, detail, kind="internal-error", title="Job failed"))


def _finish(context: JobContext, status: str, error: dict[str, Any] | None) -> None:
    try:
        with context.session() as session:
            finish(session, context.job_id, context.attempt, status, error)
    except Superseded as exc:
        log.warning("job %s: not marked %s: %s", context.job_id, status, exc)


# job kind -> "module:function" of its task, imported when a job of that kind runs (tasks import this module
# for JobContext, so the runner never imports them at module level)
TASKS: dict[str, str] = {
    "fit": "worker.tasks.fit:run_fit",
    "attribution": "worker.tasks.attribution:run_attribution",
    "edit": "worker.tasks.edit:run_edit",
}


def _dispatch(context: JobContext) -> None:
    with context.session() as session:
        job = session.get(Job, context.job_id)
        assert job is not None
        kind = job.kind
    task_for(kind)(context)


def task_for(kind: str) -> Callable[[JobContext], None]:
    module_name, function_name = TASKS[kind].split(":")
    return getattr(importlib.import_module(module_name), function_name)  # type: ignore[no-any-return]
