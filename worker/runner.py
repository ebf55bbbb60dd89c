"""Runs one job: claims its row, reports progress to it, calls the task for its kind, records the outcome.

Results and the final status are written in one transaction, so a job never shows partial results.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.session import session_scope
from service.db.tables import Job
from service.problems import problem_dict
from service.settings import Settings
from service.storage import BlobStore, LocalBlobStore
from worker.artifacts.errors import ArtifactError
from worker.attribution import AttributionError, Cancelled

log = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 0.5


@dataclass
class JobContext:
    """What a task needs: where the database and blobs are, and how to report progress."""

    job_id: str
    database_url: str
    store: BlobStore
    _last_write: float = field(default=0.0)
    _last_stage: str = field(default="")

    def session(self):  # type: ignore[no-untyped-def]
        return session_scope(self.database_url)

    def progress(self, stage: str, completed: int, total: int) -> None:
        """Write progress (throttled) and stop the work with ``Cancelled`` if the job was cancelled."""
        now = time.monotonic()
        final = total > 0 and completed >= total
        if stage == self._last_stage and now - self._last_write < PROGRESS_WRITE_SECONDS and not final:
            return
        self._last_write, self._last_stage = now, stage
        with self.session() as session:
            job = session.get(Job, self.job_id)
            if job is None or job.cancel_requested:
                raise Cancelled()
            job.progress_stage, job.progress_completed, job.progress_total = stage, completed, total


def store_for(settings: Settings) -> BlobStore:
    return LocalBlobStore(settings.resolved_storage_dir)


def run_job(job_id: str, settings: Settings) -> None:
    url = settings.resolved_database_url
    if not _claim(url, job_id):
        return
    context = JobContext(job_id=job_id, database_url=url, store=store_for(settings))
    try:
        _dispatch(context)
    except Cancelled:
        _finish(url, job_id, "cancelled", None)
    except (AttributionError, ArtifactError) as exc:
        detail = exc.detail if isinstance(exc, ArtifactError) else str(exc)
        _finish(url, job_id, "failed", problem_dict(422, detail, kind="attribution-failed", title="Job failed"))
    except Exception as exc:  # noqa: BLE001  (the job must end failed, never stay running)
        log.error("job %s crashed:\n%s", job_id, traceback.format_exc())
        detail = f"the job failed unexpectedly ({type(exc).__name__}: {exc})"
        _finish(url, job_id, "failed", problem_dict(500, detail, kind="internal-error", title="Job failed"))


def _claim(url: str, job_id: str) -> bool:
    """queued -> running. A redelivered running job (worker lost) starts over; finished jobs are left alone."""
    with session_scope(url) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status not in ("queued", "running"):
            return False
        if job.cancel_requested:
            job.status, job.finished_at = "cancelled", utcnow()
            return False
        job.status, job.started_at, job.attempts = "running", utcnow(), job.attempts + 1
        job.progress_stage, job.progress_completed, job.progress_total = "starting", 0, 0
        return True


def _finish(url: str, job_id: str, status: str, error: dict | None) -> None:  # type: ignore[type-arg]
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is not None:
            mark_finished(session, job, status, error)


def mark_finished(session: Session, job: Job, status: str, error: dict | None = None) -> None:  # type: ignore[type-arg]
    job.status, job.error, job.finished_at = status, error, utcnow()
    if status == "succeeded":
        job.progress_stage = "done"
        job.progress_completed = job.progress_total = max(job.progress_total, 1)


# job kind -> "module:function" of its task, imported when a job of that kind runs (tasks import this module
# for JobContext, so the runner never imports them at module level)
TASKS: dict[str, str] = {
    "fit": "worker.tasks.fit:run_fit",
    "attribution": "worker.tasks.attribution:run_attribution",
    "edit": "worker.tasks.edit:run_edit",
}


def _dispatch(context: JobContext) -> None:
    with context.session() as session:
        kind = session.get(Job, context.job_id).kind  # type: ignore[union-attr]
    module_name, _, function_name = TASKS[kind].partition(":")
    getattr(importlib.import_module(module_name), function_name)(context)
