"""Sharded scoring of an attribution (method `influence` with a factor strategy): prepare once, score shards on
any number of workers, merge exactly, write rows and the final status in one transaction.

The job's own task is the *coordinator*. It claims the job as usual (its heartbeat keeps the job alive), then:

1. prepares, unless an earlier attempt did: fits the curvature (or loads the stored fit), computes the
   preconditioned query vectors, stores both as blobs and creates one ``job_shards`` row per training range;
2. sends one broker message per unfinished shard (a Celery group); any worker takes a message and claims its
   shard's row (`worker/shard_rows.py`), and the coordinator itself claims and scores shards while it waits, so
   a job never waits for a free worker that is busy coordinating;
3. polls the rows: reports the shards' progress summed as the job's, stops at a cancel (shards stop at their
   next progress report), reclaims a shard whose heartbeat went stale (its worker died; the partial work is
   discarded), and fails the job when a shard failed;
4. merges the shards' outputs (`worker.attribution.shards.merge_shards`: exact, a pure function) and writes the
   result rows with the job's success in one transaction fenced by the job's attempt — a second merge, by a
   superseded attempt, finds the job no longer its own and writes nothing.

A coordinator that dies leaves the job stale: the reaper requeues it and the next attempt resumes from the rows
(done shards are kept: their outputs are blobs scored against the same prepared blobs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from safetensors.torch import load_file, save
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Job, JobShard
from service.liveness import CancelRequested, LivenessPolicy, Superseded, report_progress, worker_name
from service.problems import problem_dict
from service.storage import BlobStore, StoredBlob
from worker.attribution import Cancelled, Curvature, fit_curvature
from worker.attribution.attribute import MethodName as EngineMethodName
from worker.attribution.attribute import MethodOptions as EngineMethodOptions
from worker.attribution.attribute import _diagnostics, build_scorers
from worker.attribution.curvature.base import LayerVectors
from worker.attribution.gradients import place_model
from worker.attribution.options import FIT_STRATEGIES, FitStrategy
from worker.attribution.scoring import ModelScorer
from worker.attribution.shards import (
    ShardMode,
    ShardOutput,
    ShardRange,
    merge_shards,
    prepare_query_vectors,
    score_shard,
    shard_diagnostics,
    shard_ranges,
    vectors_from_tensors,
    vectors_to_tensors,
)
from worker.attribution.types import Progress, no_progress
from worker.context import PROGRESS_WRITE_SECONDS, JobContext, JobFailed
from worker.heartbeat import Heartbeat
from worker.loading import load_curvatures, put_curvatures
from worker.methods.base import MadeFit, Method
from worker.methods.engine_options import gradient_similarity_options, influence_options
from worker.methods.gradient_similarity import GradientSimilarityOptions
from worker.methods.influence import InfluenceOptions
from worker.shard_rows import beat_shard, claim_shard, create_shards, finish_shard, report_shard_progress, shards_of
from worker.tasks.attribution import LoadedRequest, save_results
from worker.tasks.options import loss_name, measurement_name, method_of, method_options, mode_name
from worker.tasks.rows import result_columns

log = logging.getLogger(__name__)

SHARDED_METHODS = ("influence", "gradient_similarity")
POLL_SECONDS = 0.2
STATUS_POLL_SECONDS = 0.05  # how often a coordinator with no shard to claim looks whether the others' are done
MERGE_STAGE = "merge"  # the job's progress stage while a merge runs on a cpu worker


def shard_plan(context: JobContext, request: LoadedRequest, method: Method) -> list[ShardRange] | None:
    """The job's shards, or None when it runs as one task: sharding is off, the training set fits one shard, or
    the method and strategy have no sharded path (only `influence` with a factor strategy or a stored fit, and
    `gradient_similarity`)."""
    if context.shard_examples <= 0 or len(request.train) <= context.shard_examples:
        return None
    if method.name not in SHARDED_METHODS:
        return None
    options = method_options(method, request.attribution.options)
    if isinstance(options, InfluenceOptions) and request.fit is None and options.strategy not in FIT_STRATEGIES:
        return None
    return shard_ranges(len(request.train), context.shard_examples)


# ---------------------------------------------------------------- what every shard scores against


class ShardComputation(Protocol):
    """What a shard of a job computes over its training range: its output blob's tensors (scoring:
    `ShardWork`; a sharded fit: `worker.tasks.sharded_fit.FitShardWork`)."""

    def compute(self, shard: ShardRange, progress: Progress) -> dict[str, torch.Tensor]: ...


@dataclass
class ShardWork:
    """The job's scorers (from the prepared curvatures, none for `gradient_similarity`) and preconditioned query
    vectors."""

    request: LoadedRequest
    mode: ShardMode
    batch_size: int
    scorers: list[ModelScorer]
    vectors: list[LayerVectors]
    curvatures: list[Curvature] | None
    options: EngineMethodOptions
    method: EngineMethodName
    prepared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, request: LoadedRequest, curvatures: list[Curvature] | None, progress: Progress) -> ShardWork:
        method = method_of(request.attribution.method)
        typed = method_options(method, request.attribution.options)
        options: EngineMethodOptions
        name: EngineMethodName
        if isinstance(typed, GradientSimilarityOptions):
            options, name = gradient_similarity_options(typed), "gradient_similarity"
        else:
            assert isinstance(typed, InfluenceOptions) and curvatures is not None
            influence = influence_options(typed)
            influence.strategy = cast(FitStrategy, curvatures[0].strategy)
            options, name = influence, "influence"
        placed = [place_model(module, None) for module in request.modules]
        scorers = build_scorers(placed, request.train, loss_name(request.loss), name, options, curvatures, no_progress)
        mode = mode_name(request.attribution.mode)
        return cls(request, mode, options.batch_size, scorers, [], curvatures, options, name)

    @classmethod
    def load(cls, store: BlobStore, request: LoadedRequest, prepared: dict[str, Any]) -> ShardWork:
        curvatures = None
        if prepared.get("curvatures") is not None:
            stored = load_curvatures(store, prepared["curvatures"])
            curvatures = [stored[str(i)] for i in range(len(stored))]
        work = cls.build(request, curvatures, no_progress)
        if prepared.get("queries") is not None:
            work.vectors = vectors_from_tensors(load_tensors(store, prepared["queries"]), len(work.scorers))
        else:
            work.vectors = [{} for _ in work.scorers]
        work.prepared = prepared
        return work

    def compute(self, shard: ShardRange, progress: Progress) -> dict[str, torch.Tensor]:
        return self.score(shard, progress).to_tensors()

    def score(self, shard: ShardRange, progress: Progress) -> ShardOutput:
        return score_shard(
            self.scorers,
            self.request.train,
            shard,
            self.mode,
            self.vectors,
            self.request.attribution.top_k,
            self.batch_size,
            progress,
        )


def put_tensors(store: BlobStore, tensors: dict[str, torch.Tensor]) -> str:
    """A safetensors blob of intermediate tensors (no Blob row: it is not an artifact of any tenant)."""
    return store.stage_bytes_from(iter([save(tensors)]), limit=1 << 62).commit().sha256


def load_tensors(store: BlobStore, sha256: str) -> dict[str, torch.Tensor]:
    with store.local_path(sha256) as path:
        return load_file(str(path))


# ---------------------------------------------------------------- one shard, run by any worker


def run_one_shard(
    work: ShardComputation,
    database_url: str,
    store: BlobStore,
    shard: ShardRange,
    attempt: int,
    heartbeat: Heartbeat,
    also: Progress = no_progress,
) -> None:
    """Run one claimed shard and mark it done with its output blob. Raises ``Superseded`` when the shard was
    taken over, ``Cancelled`` when its job was cancelled or ended. ``also``: called after each progress write."""
    job_id = heartbeat.job_id
    last = 0.0

    def progress(stage: str, completed: int, total: int) -> None:
        nonlocal last
        if heartbeat.lost.is_set():
            raise Superseded(f"job {job_id} shard {shard.index} attempt {attempt} lost its shard")
        now = time.monotonic()
        if now - last < PROGRESS_WRITE_SECONDS and not (total > 0 and completed >= total):
            return
        last = now
        from service.db.session import session_scope

        with session_scope(database_url) as session:
            try:
                report_shard_progress(session, job_id, shard.index, attempt, completed, total)
            except CancelRequested:
                raise Cancelled() from None
        also(stage, completed, total)

    sha256 = put_tensors(store, work.compute(shard, progress))
    from service.db.session import session_scope

    with session_scope(database_url) as session:
        finish_shard(session, job_id, shard.index, attempt, sha256)


def shard_heartbeat(database_url: str, job_id: str, shard: int, attempt: int, period: float) -> Heartbeat:
    return Heartbeat(
        database_url, job_id, attempt, period, beat_once=lambda session: beat_shard(session, job_id, shard, attempt)
    )


# ---------------------------------------------------------------- the coordinator


def run_sharded(context: JobContext, request: LoadedRequest, method: Method, ranges: list[ShardRange]) -> None:
    policy = context.policy
    assert policy is not None, "a sharded job needs the liveness policy"
    existing = scoring_rows(context)
    if existing:
        work = ShardWork.load(context.store, request, existing[0][1])
        log.info("job %s: resuming %d shards", context.job_id, len(existing))
    else:
        curvatures = _own_fit_in_shards(context, request)
        offset = len(_all_rows(context))  # the fit's shards (if it made its own in shards) come first
        ranges = [ShardRange(offset + r.index, r.start, r.stop) for r in ranges]
        work = _prepare(context, request, ranges, curvatures)
    scoring = {shard for shard, _ in scoring_rows(context)}
    send_pending(context, scoring)
    wait_for_shards(context, work, policy, "score", len(request.train), scoring)
    merge_or_hand_over(context, lambda: merge_and_save(context, request, method, work))


def _all_rows(context: JobContext) -> list[tuple[int, dict[str, Any]]]:
    with context.session() as session:
        return [(row.shard, dict(row.prepared)) for row in shards_of(session, context.job_id)]


def scoring_rows(context: JobContext) -> list[tuple[int, dict[str, Any]]]:
    """(position, prepared) of the job's scoring shards (not those of the fit it made for itself in shards)."""
    return [(shard, prepared) for shard, prepared in _all_rows(context) if prepared.get("job") is None]


def _own_fit_in_shards(context: JobContext, request: LoadedRequest) -> list[Curvature] | None:
    """The curvatures an `influence` job without a stored fit fits for itself, in shards (`worker.tasks
    .sharded_fit`, resumed from its rows) when its strategy sums over the training set and the set is larger
    than a shard; None: fitted in `_prepare`, in one pass."""
    from worker.tasks.sharded_fit import fit_in_shards, fit_request_of, fit_shard_plan, fitted_curvatures

    if request.fit is not None:
        return None
    fit_request = fit_request_of(request)
    if fit_request is None or (plan := fit_shard_plan(context, fit_request)) is None:
        return None
    fit_in_shards(context, fit_request, plan)
    fitted = fitted_curvatures(context, fit_request)
    return [fitted[str(position)] for position in range(len(request.modules))]


def send_pending(context: JobContext, shards: set[int] | None = None) -> None:
    """One message per unfinished shard (of ``shards``, or of the job)."""
    with context.session() as session:
        pending = [
            row.shard
            for row in shards_of(session, context.job_id)
            if row.status != "done" and (shards is None or row.shard in shards)
        ]
    if pending and context.send_shards is not None:
        context.send_shards(context.job_id, pending)


def merge_or_hand_over(context: JobContext, merge: Callable[[], None]) -> None:
    """Merge here, or — on a worker that does not consume the ``cpu`` queue (``context.send_merge`` set) — send
    the merge to that queue and return as soon as a ``cpu`` worker has taken it (it writes the job's stage
    ``merge`` under this attempt, and keeps the job's heartbeat from then on). A merge no ``cpu`` worker took
    within ``merge_handoff_seconds`` runs here; two merges of one attempt are harmless (fenced: one writes)."""
    if context.send_merge is None:
        merge()
        return
    context.send_merge(context.job_id, context.attempt)
    deadline = time.monotonic() + context.merge_handoff_seconds
    while time.monotonic() < deadline:
        with context.session() as session:
            job = session.get(Job, context.job_id, populate_existing=True)
            if job is None or job.status != "running" or job.attempts != context.attempt:
                return  # the merge ended the job (or the job was taken over: nothing more to do here)
            if job.progress_stage == MERGE_STAGE:
                log.info("job %s: merge taken by a cpu worker", context.job_id)
                return
            if job.cancel_requested:
                raise Cancelled()
        time.sleep(POLL_SECONDS)
    log.warning(
        "job %s: no cpu worker took the merge in %.0f s; merging here", context.job_id, context.merge_handoff_seconds
    )
    merge()


def _prepare(
    context: JobContext, request: LoadedRequest, ranges: list[ShardRange], curvatures: list[Curvature] | None
) -> ShardWork:
    """Fit (unless ``curvatures`` were fitted in shards) or load the curvatures, compute the query vectors, store
    both and create the scoring shards' rows (positions ``ranges``' indices)."""
    typed = method_options(method_of(request.attribution.method), request.attribution.options)
    if curvatures is None and request.fit is not None and request.fit.artifact_sha256 is not None:
        curvatures = [load_curvatures(context.store, request.fit.artifact_sha256)["model"]]
    elif curvatures is None and isinstance(typed, InfluenceOptions):
        from worker.methods.engine_options import fit_options

        curvatures = [
            fit_curvature(
                module,
                request.train,
                loss_name(request.loss),
                fit_options(typed.fit_settings()),
                progress=context.progress,
            )
            for module in request.modules
        ]
    work = ShardWork.build(request, curvatures, context.progress)
    if request.query is not None:
        work.vectors = prepare_query_vectors(
            work.scorers,
            request.query,
            work.mode,
            measurement_name(request.attribution.measurement),
            work.batch_size,
            context.progress,
        )
    else:
        work.vectors = [{} for _ in work.scorers]
    queries = put_tensors(context.store, vectors_to_tensors(work.vectors)) if work.mode != "self" else None
    with context.session() as session:
        blob = _put_without_index(session, context.store, curvatures) if curvatures is not None else None
        work.prepared = {"curvatures": blob.sha256 if blob is not None else None, "queries": queries}
        try:  # fenced: only the attempt that owns the job creates its shards
            report_progress(session, context.job_id, context.attempt, "score", 0, len(request.train))
        except CancelRequested:
            raise Cancelled() from None
        create_shards(session, context.job_id, ranges, work.prepared)
    return work


def _put_without_index(session: Session, store: BlobStore, curvatures: list[Curvature]) -> StoredBlob:
    """The curvatures as one blob for the shards, without the training-gradient index a fit may keep (rows of
    the whole training set: a shard recomputes its own range's gradients instead of loading every row)."""
    indexes = [curvature.training_index for curvature in curvatures]
    try:
        for curvature in curvatures:
            curvature.training_index = None
        return put_curvatures(session, store, {str(i): c for i, c in enumerate(curvatures)})
    finally:
        for curvature, index in zip(curvatures, indexes, strict=True):
            curvature.training_index = index


def wait_for_shards(
    context: JobContext,
    work: ShardComputation,
    policy: LivenessPolicy,
    stage: str,
    total: int,
    shards: set[int] | None = None,
    done_before: int = 0,
) -> None:
    """Until every shard (of ``shards``, or of the job) is done: report their summed progress (stage ``stage``,
    ``done_before`` + completed examples of ``total``), run claimable shards here, fail on a failed shard.

    The coordinator claims the job's shards from the last one down (``last_first``), while the other workers
    take the shards' messages, sent in order, from the first one up: a worker seldom gets the message of a
    shard the coordinator already took (each costs it a claim round trip while the job waits). With nothing left
    to claim, it looks at the shards' statuses every ``STATUS_POLL_SECONDS`` (the job ends soon after its last
    shard) and makes a full round (progress, a stale shard to reclaim) every ``POLL_SECONDS``."""

    def report(*_: Any) -> None:
        context.progress(stage, done_before + _completed(context, shards), total)

    while True:
        with context.session() as session:
            rows = [row for row in shards_of(session, context.job_id) if shards is None or row.shard in shards]
            failed = [row for row in rows if row.status == "failed"]
            if failed:  # the job fails with the shard's problem (a time limit, bad input found while scoring)
                raise JobFailed(
                    failed[0].error
                    or problem_dict(500, f"shard {failed[0].shard} failed", kind="internal-error", title="Job failed")
                )
            if all(row.status == "done" for row in rows):
                return
            statuses = _statuses(rows)
            completed = _completed_of(rows)
        context.progress(stage, done_before + completed, total)
        with context.session() as session:
            claimed = claim_shard(session, context.job_id, None, policy, worker_name(), among=shards, last_first=True)
            shard = (
                None
                if claimed is None
                else (ShardRange(claimed[0].shard, claimed[0].start, claimed[0].stop), claimed[1])
            )
        if shard is None:
            _wait_for_status_change(context, shards, statuses)
            continue
        (shard_range, attempt) = shard
        with shard_heartbeat(
            context.database_url, context.job_id, shard_range.index, attempt, policy.heartbeat_seconds
        ) as heartbeat:
            try:
                run_one_shard(work, context.database_url, context.store, shard_range, attempt, heartbeat, report)
            except Superseded as exc:  # another worker reclaimed it (this one looked dead): it finishes it
                log.warning("job %s: %s", context.job_id, exc)


def _statuses(rows: list[JobShard]) -> dict[int, str]:
    return {row.shard: row.status for row in rows}


def _wait_for_status_change(context: JobContext, shards: set[int] | None, statuses: dict[int, str]) -> None:
    """Return once a shard's status differs from ``statuses`` (one changed: done, failed, reclaimed), or after
    ``POLL_SECONDS``."""
    deadline = time.monotonic() + POLL_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(STATUS_POLL_SECONDS, left))
        with context.session() as session:
            now = {
                shard: status
                for shard, status in session.execute(
                    select(JobShard.shard, JobShard.status).where(JobShard.job_id == context.job_id)
                ).tuples()
                if shards is None or shard in shards
            }
        if now != statuses:
            return


def _completed(context: JobContext, shards: set[int] | None = None) -> int:
    with context.session() as session:
        return _completed_of(
            [row for row in shards_of(session, context.job_id) if shards is None or row.shard in shards]
        )


def _completed_of(rows: list[JobShard]) -> int:
    """Training examples done in ``rows``: the done shards' and the running shards' reported share."""
    completed = 0
    for row in rows:
        size = row.stop - row.start
        if row.status == "done":
            completed += size
        elif row.progress_total > 0:
            completed += size * row.progress_completed // row.progress_total
    return completed


def merge_and_save(context: JobContext, request: LoadedRequest, method: Method, work: ShardWork) -> None:
    with context.session() as session:
        rows = [row for row in shards_of(session, context.job_id) if row.prepared.get("job") is None]
        outputs = [
            ShardOutput.from_tensors(work.mode, load_tensors(context.store, row.output_sha256))
            for row in rows
            if row.output_sha256 is not None
        ]
        ranges = [ShardRange(row.shard, row.start, row.stop) for row in rows]
    attribution = request.attribution
    scores = merge_shards(outputs, work.mode, attribution.top_k, len(request.train))
    scores.diagnostics = _diagnostics(
        work.scorers,
        request.train,
        request.query,
        work.method,
        work.mode,
        measurement_name(attribution.measurement),
        work.options,
    )
    scores.diagnostics.update(shard_diagnostics(ranges))
    query_ids = request.query_arrays.ids.tolist() if request.query_arrays is not None else None
    columns = result_columns(
        scores, method.name, attribution.top_k, request.train_arrays.ids.tolist(), query_ids, request.query_tokens
    )
    made: list[MadeFit] = []
    typed = method_options(method, attribution.options)
    if request.fit is None and isinstance(typed, InfluenceOptions) and work.curvatures is not None:
        made = [
            MadeFit(model_id=model.id, curvature=curvature, settings=typed.fit_settings(), damping=typed.damping)
            for model, curvature in zip(request.models, work.curvatures, strict=True)
        ]
    save_results(context, request, scores, columns, made)
