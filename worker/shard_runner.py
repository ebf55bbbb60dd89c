"""Runs one shard of a sharded job (worker/tasks/sharded.py, worker/tasks/sharded_fit.py): claims its row, keeps
the shard's heartbeat, scores (or sums the fit's statistics over) its training range and marks it done with its
output blob — or failed, which fails the job.

The message carries the job id and the shard's position; the rows are the truth. A message for a shard that is
done, runs under a live worker, or whose job finished or was cancelled is dropped.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from service.db.session import session_scope
from service.liveness import LivenessPolicy, Superseded, time_limit_problem, worker_name
from service.problems import problem_dict
from service.settings import Settings
from service.storage import BlobStore
from worker.artifacts.errors import ArtifactError
from worker.attribution import AttributionError, Cancelled
from worker.attribution.shards import ShardRange
from worker.context import JobContext
from worker.runner import store_for
from worker.shard_rows import claim_shard, fail_shard
from worker.tasks.attribution import load_request
from worker.tasks.sharded import ShardComputation, ShardWork, run_one_shard, shard_heartbeat
from worker.tasks.sharded_fit import FIT_JOB, FitShardWork, load_fit_request

log = logging.getLogger(__name__)


def run_shard(job_id: str, shard: int, settings: Settings) -> None:
    url = settings.resolved_database_url
    policy = LivenessPolicy.from_settings(settings)
    with session_scope(url) as session:
        claimed = claim_shard(session, job_id, shard, policy, worker_name())
        if claimed is None:
            log.info("job %s shard %d: message dropped (done, running elsewhere, or its job ended)", job_id, shard)
            return
        row, attempt = claimed
        shard_range, prepared = ShardRange(row.shard, row.start, row.stop), dict(row.prepared)
    store = store_for(settings)
    with shard_heartbeat(url, job_id, shard, attempt, policy.heartbeat_seconds) as heartbeat:
        try:
            work = _work_for(job_id, url, store, prepared, settings.device)
            run_one_shard(work, url, store, shard_range, attempt, heartbeat)
        except (Superseded, Cancelled) as exc:
            log.warning("job %s shard %d: stopped (%s)", job_id, shard, type(exc).__name__)
        except SoftTimeLimitExceeded:
            _fail(url, job_id, shard, attempt, time_limit_problem(settings.shard_soft_time_limit_seconds))
        except (AttributionError, ArtifactError) as exc:
            detail = exc.detail if isinstance(exc, ArtifactError) else str(exc)
            _fail(url, job_id, shard, attempt, problem_dict(422, detail, kind="attribution-failed", title="Job failed"))
        except Exception as exc:  # noqa: BLE001  (the shard must end failed, never stay running)
            log.error("job %s shard %d crashed:\n%s", job_id, shard, traceback.format_exc())
            detail = f"a shard of the job failed unexpectedly ({type(exc).__name__}: {exc})"
            _fail(url, job_id, shard, attempt, problem_dict(500, detail, kind="internal-error", title="Job failed"))


# The last job's loaded model, training set and prepared blobs, in this process: a worker that takes several
# shards of one job in a row loads them once (the whole training set, whatever the shard).
_LOADED: dict[tuple[str, ...], ShardComputation] = {}


def _work_for(
    job_id: str, url: str, store: BlobStore, prepared: dict[str, Any], device_setting: str
) -> ShardComputation:
    """The shard's work: a sharded fit's phase (``prepared["job"] == "fit"``) or a sharded scoring job's."""
    key = (job_id, *(f"{k}={prepared[k]}" for k in sorted(prepared)))
    if key not in _LOADED:
        _LOADED.clear()
        context = JobContext(job_id=job_id, database_url=url, store=store, device_setting=device_setting)
        if prepared.get("job") == FIT_JOB:
            _LOADED[key] = FitShardWork.load(store, load_fit_request(context), prepared, context.device)
        else:
            _LOADED[key] = ShardWork.load(store, load_request(context), prepared)
    return _LOADED[key]


def _fail(url: str, job_id: str, shard: int, attempt: int | None, error: dict[str, object]) -> None:
    with session_scope(url) as session:
        fail_shard(session, job_id, shard, attempt, error)
