"""Sharded fits: a fit job over a training set larger than a shard sums its statistics shard by shard on any
number of workers, then reduces them exactly (`worker.attribution.fit_shards`).

The fit job's task is the coordinator, as for sharded scoring (`worker.tasks.sharded`, same rows, claims,
heartbeats, liveness and cancel):

1. creates one ``job_shards`` row per training range (ranges start at multiples of the fit's batch size),
   fenced by the job's attempt; ``prepared`` says ``{"job": "fit", "phase": ...}``;
2. phase one: every shard sums, for each fitted target (the model, or each chosen checkpoint), the covariance
   sums (K-FAC, EK-FAC) or the squared gradients (diagonal) over its range, stored as a safetensors blob;
3. EK-FAC only, phase two: once every phase-one shard is done the coordinator reduces their covariances,
   eigendecomposes them, stores the eigenbases as a blob and creates a second set of rows (positions after the
   first set's) whose shards sum the squared rotated gradients in those bases;
4. the merge — reduce the sums, build each target's curvature, store the fit blob and the job's success in one
   transaction fenced by the attempt — runs here, or on a ``cpu`` worker (`merge_or_hand_over`).

A coordinator that dies leaves the job stale; the next attempt resumes from the rows: done shards are kept, and
a phase-two set that exists is resumed with the bases its rows name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import select
from torch import nn

from service.db.tables import Checkpoint, Dataset, Fit, Model
from service.liveness import CancelRequested, report_progress
from service.storage import BlobStore
from worker.attribution import Cancelled, Curvature
from worker.attribution.fit_shards import (
    SEPARATOR,
    SHARDED_FIT_STRATEGIES,
    FitPhase,
    bases_from_sums,
    curvature_from_sums,
    first_phase,
    fit_shard_ranges,
    fit_shard_sums,
    reduce_sums,
    sums_from_tensors,
    sums_to_tensors,
)
from worker.attribution.losses import LossName
from worker.attribution.options import FitOptions
from worker.attribution.shards import ShardRange
from worker.attribution.statistics import Eigenbasis, LayerSums
from worker.attribution.types import Examples, Progress
from worker.context import JobContext
from worker.loading import load_checkpoint, load_examples, load_model, put_curvatures
from worker.methods.engine_options import fit_options
from worker.shard_rows import create_shards, shards_of
from worker.tasks.attribution import LoadedRequest
from worker.tasks.options import fit_settings, loss_name
from worker.tasks.sharded import load_tensors, merge_or_hand_over, put_tensors, send_pending, wait_for_shards

log = logging.getLogger(__name__)

FIT_JOB = "fit"  # ``prepared["job"]`` of a fit's shard rows
BASIS_FIELDS = ("activation_eigenvalues", "activation_eigenvectors", "gradient_eigenvalues", "gradient_eigenvectors")


@dataclass
class FitRequest:
    """A fit job's inputs: the Fit row's id, its engine options and loss, the targets fitted, the training set."""

    fit_id: str
    options: FitOptions
    loss: LossName
    targets: dict[str, nn.Module]
    train: Examples


def load_fit_request(context: JobContext) -> FitRequest:
    """The fit job's request; for an attribution job, the fit it makes for itself (one target per model)."""
    with context.session() as session:
        fit = session.scalars(select(Fit).where(Fit.job_id == context.job_id)).one_or_none()
    if fit is None:
        return _attribution_fit_request(context)
    with context.session() as session:
        model = session.get_one(Model, fit.model_id)
        dataset = session.get_one(Dataset, fit.dataset_id)
        checkpoints = [session.get(Checkpoint, c) for c in (fit.checkpoint_ids or [])]
    train, _ = load_examples(context.store, dataset)
    targets = (
        {"model": load_model(context.store, model)}
        if not checkpoints
        else {c.id: load_checkpoint(context.store, model, c) for c in checkpoints if c is not None}
    )
    return FitRequest(fit.id, fit_options(fit_settings(fit.options)), loss_name(model.task["loss"]), targets, train)


def _attribution_fit_request(context: JobContext) -> FitRequest:
    from worker.tasks.attribution import load_request

    fit_request = fit_request_of(load_request(context))
    assert fit_request is not None, "only influence attributions with a factor strategy fit in shards"
    return fit_request


def fit_request_of(request: LoadedRequest) -> FitRequest | None:
    """The fit an `influence` attribution without a stored fit makes for itself (one target per model, named
    by position), or None for other methods."""
    from worker.methods.influence import InfluenceOptions
    from worker.tasks.options import method_of, method_options

    typed = method_options(method_of(request.attribution.method), request.attribution.options)
    if not isinstance(typed, InfluenceOptions):
        return None
    targets = {str(position): module for position, module in enumerate(request.modules)}
    return FitRequest("", fit_options(typed.fit_settings()), loss_name(request.loss), targets, request.train)


def fit_shard_plan(context: JobContext, request: FitRequest) -> list[ShardRange] | None:
    """The fit's shards, or None when it runs as one task: sharding is off, the training set fits one shard, or
    the strategy has nothing to sum (identity)."""
    options = request.options
    if context.shard_examples <= 0 or len(request.train) <= context.shard_examples:
        return None
    if options.strategy not in SHARDED_FIT_STRATEGIES:
        return None
    ranges = fit_shard_ranges(len(request.train), context.shard_examples, options.batch_size)
    return ranges if len(ranges) > 1 else None


@dataclass
class FitShardWork:
    """One phase of a sharded fit, as any worker runs its shards: every target's sums over the shard's range."""

    request: FitRequest
    phase: FitPhase
    bases: dict[str, dict[str, Eigenbasis]] = field(default_factory=dict)
    device: torch.device | None = None

    def compute(self, shard: ShardRange, progress: Progress) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        targets = list(self.request.targets.items())
        for position, (name, module) in enumerate(targets):

            def target_progress(stage: str, completed: int, total: int, position: int = position) -> None:
                progress(stage, position * shard.size + completed, len(targets) * shard.size)

            sums = fit_shard_sums(
                module,
                self.request.train,
                self.request.loss,
                self.request.options,
                shard,
                self.phase,
                self.bases.get(name),
                target_progress,
                self.device,
            )
            tensors.update(sums_to_tensors(sums, f"{name}{SEPARATOR}"))
        return tensors

    @classmethod
    def load(
        cls, store: BlobStore, request: FitRequest, prepared: dict[str, Any], device: torch.device | None
    ) -> FitShardWork:
        phase: FitPhase = prepared["phase"]
        bases = load_bases(store, prepared["bases"], list(request.targets)) if prepared.get("bases") else {}
        return cls(request, phase, bases, device)


def put_bases(store: BlobStore, bases: dict[str, dict[str, Eigenbasis]]) -> str:
    tensors = {
        f"{target}{SEPARATOR}{layer}{SEPARATOR}{name}": getattr(basis, name).cpu().contiguous()
        for target, per_layer in bases.items()
        for layer, basis in per_layer.items()
        for name in BASIS_FIELDS
    }
    return put_tensors(store, tensors)


def load_bases(store: BlobStore, sha256: str, targets: list[str]) -> dict[str, dict[str, Eigenbasis]]:
    tensors = load_tensors(store, sha256)
    bases: dict[str, dict[str, Eigenbasis]] = {}
    for target in targets:
        prefix = f"{target}{SEPARATOR}"
        layers = {key[len(prefix) :].rsplit(SEPARATOR, 1)[0] for key in tensors if key.startswith(prefix)}
        bases[target] = {
            layer: Eigenbasis(*(tensors[f"{prefix}{layer}{SEPARATOR}{name}"] for name in BASIS_FIELDS))
            for layer in layers
        }
    return bases


# ---------------------------------------------------------------- the coordinator


def run_sharded_fit(context: JobContext, request: FitRequest, ranges: list[ShardRange]) -> None:
    fit_in_shards(context, request, ranges)
    merge_or_hand_over(context, lambda: merge_fit(context, request))


def fit_rows(context: JobContext) -> list[tuple[int, dict[str, Any]]]:
    """(position, prepared) of the job's fit shards (an attribution's scoring shards follow them)."""
    with context.session() as session:
        return [
            (row.shard, dict(row.prepared))
            for row in shards_of(session, context.job_id)
            if row.prepared.get("job") == FIT_JOB
        ]


def fit_in_shards(context: JobContext, request: FitRequest, ranges: list[ShardRange]) -> None:
    """Run the fit's phases in shards until every fit shard is done (resuming from the rows there are)."""
    policy = context.policy
    assert policy is not None, "a sharded job needs the liveness policy"
    options = request.options
    passes = 2 if options.strategy == "ekfac" else 1
    total = passes * len(request.train)
    rows = fit_rows(context)
    if not rows:
        first = {"job": FIT_JOB, "phase": first_phase(options.strategy)}
        _create_fenced(context, ranges, first, total)
        rows = [(shard.index, first) for shard in ranges]
    first_set = {shard for shard, prepared in rows if prepared["phase"] != "eigenvalues"}
    second = [(shard, prepared) for shard, prepared in rows if prepared["phase"] == "eigenvalues"]
    if not second:
        work = FitShardWork(request, first_phase(options.strategy), device=context.device)
        send_pending(context, first_set)
        wait_for_shards(context, work, policy, "fit", total, first_set)
        if options.strategy == "ekfac":
            bases = {
                target: bases_from_sums(sums) for target, sums in reduce_phase(context, request, first_set).items()
            }
            prepared = {"job": FIT_JOB, "phase": "eigenvalues", "bases": put_bases(context.store, bases)}
            offset = len(first_set)
            second_ranges = [ShardRange(offset + r.index, r.start, r.stop) for r in _ranges_of(context, first_set)]
            _create_fenced(context, second_ranges, prepared, total, done=len(request.train))
            second = [(r.index, prepared) for r in second_ranges]
    if second:
        second_set = {shard for shard, _ in second}
        work = FitShardWork.load(context.store, request, second[0][1], context.device)
        send_pending(context, second_set)
        wait_for_shards(context, work, policy, "fit", total, second_set, done_before=len(request.train))


def _create_fenced(
    context: JobContext, ranges: list[ShardRange], prepared: dict[str, Any], total: int, done: int = 0
) -> None:
    with context.session() as session:
        try:  # fenced: only the attempt that owns the job creates its shards
            report_progress(session, context.job_id, context.attempt, "fit", done, total)
        except CancelRequested:
            raise Cancelled() from None
        create_shards(session, context.job_id, ranges, prepared)


def _ranges_of(context: JobContext, shards: set[int]) -> list[ShardRange]:
    with context.session() as session:
        return [
            ShardRange(row.shard, row.start, row.stop)
            for row in shards_of(session, context.job_id)
            if row.shard in shards
        ]


def reduce_phase(context: JobContext, request: FitRequest, shards: set[int]) -> dict[str, dict[str, LayerSums]]:
    """Each target's sums over the whole training set: the done shards' sums (in shard order) added up."""
    with context.session() as session:
        blobs = [
            row.output_sha256
            for row in shards_of(session, context.job_id)
            if row.shard in shards and row.output_sha256 is not None
        ]
    if len(blobs) != len(shards):
        raise RuntimeError(f"job {context.job_id}: {len(shards) - len(blobs)} shards have no output")
    outputs = [load_tensors(context.store, sha256) for sha256 in blobs]
    return {
        target: reduce_sums([sums_from_tensors(tensors, f"{target}{SEPARATOR}") for tensors in outputs])
        for target in request.targets
    }


def fitted_curvatures(context: JobContext, request: FitRequest) -> dict[str, Curvature]:
    """Each target's curvature from the done fit shards' sums."""
    rows = fit_rows(context)
    first = reduce_phase(context, request, {s for s, p in rows if p["phase"] != "eigenvalues"})
    second_set = {s for s, p in rows if p["phase"] == "eigenvalues"}
    second = reduce_phase(context, request, second_set) if second_set else {}
    return {
        target: curvature_from_sums(request.options, first[target], second.get(target)) for target in request.targets
    }


def merge_fit(context: JobContext, request: FitRequest) -> None:
    """The fitted curvatures from the shards' sums; the fit blob and the job's success in one transaction fenced
    by the job's attempt (a second merge, by a superseded attempt, writes nothing)."""
    curvatures = fitted_curvatures(context, request)
    with context.session() as session:
        context.succeed(session)  # first: ends the transaction early if the job was cancelled or taken over
        blob = put_curvatures(session, context.store, curvatures)
        stored = session.get_one(Fit, request.fit_id)
        stored.artifact_sha256 = blob.sha256
