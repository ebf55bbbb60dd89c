"""Runs one job: claims its row, keeps its heartbeat, reports progress to it, calls the task for its kind, records
the outcome.

Results and the final status are written in one transaction, so a job never shows partial results. Every write
is fenced by the attempt number of the claim (see `service.liveness`): an attempt that was presumed dead and
replaced stops at its next progress report and can never write results or a status.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from service.db.session import session_scope
from service.db.tables import Job
from service.liveness import (
    CancelRequested,
    LivenessPolicy,
    Superseded,
    claim,
    finish,
    time_limit_problem,
    worker_name,
)
from service.problems import problem_dict
from service.settings import Settings
from service.storage import BlobStore, LocalBlobStore
from worker.artifacts.errors import ArtifactError
from worker.attribution import AttributionError, Cancelled
from worker.context import JobContext, JobFailed, MergeSender, ShardSender
from worker.heartbeat import Heartbeat
from worker.tasks import JOB_KINDS, JobTask

# job kind -> its task (worker/tasks/__init__.py); the tasks import worker.context, never this module
TASKS = JOB_KINDS

log = logging.getLogger(__name__)


def store_for(settings: Settings) -> BlobStore:
    return LocalBlobStore(settings.resolved_storage_dir)


def run_job(
    job_id: str,
    settings: Settings,
    send_shards: ShardSender | None = None,
    send_merge: MergeSender | None = None,
) -> None:
    url = settings.resolved_database_url
    policy = LivenessPolicy.from_settings(settings)
    with session_scope(url) as session:
        attempt = claim(session, job_id, policy, worker_name())
    if attempt is None:
        log.info("job %s: message dropped (finished, running elsewhere, cancelled or out of attempts)", job_id)
        return
    with Heartbeat(url, job_id, attempt, policy.heartbeat_seconds) as heartbeat:
        context = JobContext(
            job_id=job_id,
            database_url=url,
            store=store_for(settings),
            attempt=attempt,
            heartbeat=heartbeat,
            device_setting=settings.device,
            policy=policy,
            shard_examples=settings.shard_examples,
            send_shards=send_shards,
            send_merge=send_merge,
            merge_handoff_seconds=settings.merge_handoff_seconds,
        )
        _run_and_record(context, policy)


def _run_and_record(context: JobContext, policy: LivenessPolicy) -> None:
    run_and_record(context, policy, lambda: _dispatch(context), "the job")


def run_and_record(context: JobContext, policy: LivenessPolicy, work: Callable[[], None], what: str) -> None:
    """Run ``work`` for the claimed job and record how it ended (`what` names it in logs and errors): a superseded
    attempt writes nothing, a cancel ends it ``cancelled``, every failure ends it ``failed`` with a problem, and
    nothing leaves it ``running``. The job runner and the merge runner (`worker.merge_runner`) share it."""
    job_id = context.job_id
    try:
        work()
    except Superseded as exc:
        log.warning("job %s: %s dropped: %s", job_id, what, exc)
    except Cancelled:
        _finish(context, "cancelled", None)
    except JobFailed as exc:
        _finish(context, "failed", exc.problem)
    except SoftTimeLimitExceeded:
        _finish(context, "failed", time_limit_problem(policy.soft_time_limit_seconds))
    except (AttributionError, ArtifactError) as exc:
        detail = exc.detail if isinstance(exc, ArtifactError) else str(exc)
        _finish(context, "failed", problem_dict(422, detail, kind="attribution-failed", title="Job failed"))
    except Exception as exc:  # noqa: BLE001  (the job must end failed, never stay running)
        log.error("job %s: %s crashed:\n%s", job_id, what, traceback.format_exc())
        detail = f"{what} failed unexpectedly ({type(exc).__name__}: {exc})"
        _finish(context, "failed", problem_dict(500, detail, kind="internal-error", title="Job failed"))


def _finish(context: JobContext, status: str, error: dict[str, Any] | None) -> None:
    try:
        with context.session() as session:
            finish(session, context.job_id, context.attempt, status, error)
    except (Superseded, CancelRequested) as exc:
        log.warning("job %s: not marked %s: %s", context.job_id, status, exc)


def _dispatch(context: JobContext) -> None:
    with context.session() as session:
        job = session.get(Job, context.job_id)
        assert job is not None
        kind = job.kind
    task_for(kind)(context)


def task_for(kind: str) -> JobTask:
    return TASKS[kind]
