"""Runs the merge of a sharded job on a ``cpu`` worker (`worker.tasks.sharded.merge_or_hand_over`).

The message carries the job id and the coordinator's attempt; the rows are the truth. The merge runs only while
the job is still ``running`` under that attempt: it writes the job's stage ``merge`` (fenced by the attempt: the
coordinator, seeing it, returns and frees its worker), keeps the job's heartbeat under the same attempt, merges
the shards' outputs and writes the results (or the fit) with the job's success in one transaction fenced by the
attempt. A message for an attempt that no longer owns the job — the job finished, was merged by its coordinator
after no ``cpu`` worker took the merge in time, or was taken over — is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.db.session import session_scope
from service.db.tables import Job
from service.liveness import CancelRequested, LivenessPolicy, Superseded, report_progress
from service.settings import Settings
from worker.context import JobContext
from worker.heartbeat import Heartbeat
from worker.runner import run_and_record, store_for
from worker.tasks.attribution import load_request
from worker.tasks.options import method_of
from worker.tasks.sharded import MERGE_STAGE, ShardWork, merge_and_save, scoring_rows
from worker.tasks.sharded_fit import load_fit_request, merge_fit

log = logging.getLogger(__name__)


def run_merge(job_id: str, attempt: int, settings: Settings) -> None:
    url = settings.resolved_database_url
    policy = LivenessPolicy.from_settings(settings)
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "running" or job.attempts != attempt:
            log.info("job %s: merge message of attempt %d dropped (the job moved on)", job_id, attempt)
            return
        kind = job.kind
        try:
            total = job.progress_total  # the shards' total, kept: the job ends with it
            report_progress(session, job_id, attempt, MERGE_STAGE, total, total)
        except (Superseded, CancelRequested):
            log.info("job %s: merge message of attempt %d dropped (cancelled or taken over)", job_id, attempt)
            return
    context = JobContext(
        job_id=job_id,
        database_url=url,
        store=store_for(settings),
        attempt=attempt,
        device_setting="cpu",
        policy=policy,
    )
    with Heartbeat(url, job_id, attempt, policy.heartbeat_seconds) as heartbeat:
        context.heartbeat = heartbeat
        run_and_record(context, policy, lambda: MERGES[kind](context), "the merge of the job's shards")


def _merge_fit(context: JobContext) -> None:
    merge_fit(context, load_fit_request(context))


def _merge_attribution(context: JobContext) -> None:
    request = load_request(context)
    work = ShardWork.load(context.store, request, scoring_rows(context)[0][1])
    merge_and_save(context, request, method_of(request.attribution.method), work)


# job kind -> how its shards are merged (the kinds that shard)
MERGES: dict[str, Callable[[JobContext], None]] = {"fit": _merge_fit, "attribution": _merge_attribution}
