"""Job glue for the trajectory methods (``source``, ``tracin``) and SOURCE editing.

Checkpoints are the model's rows of ``checkpoints`` (ordered by stage, step); the model's own weights are the
final parameters. ``options.stage_datasets`` ({"0": id, ...}) gives each stage's training dataset (default:
the attribution's train_dataset_id); ``options.stages`` (default: every stage whose dataset is the
train_dataset_id) says which stages' segments (SOURCE) or checkpoints (TracInCP) score the training examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from service.db.tables import Attribution, Checkpoint, Dataset, Model
from service.storage import BlobStore
from worker.attribution import (AttributionError, AttributionScores, EditOptions, EditResult, Examples, Progress,
                                assess_edit, retrain_objective_edit)
from worker.attribution.methods.source import SourceOptions, attribute_source
from worker.attribution.methods.source import edit_source as engine_edit_source
from worker.attribution.methods.tracin import TracInOptions, attribute_tracin
from worker.attribution.trajectory import TrajectoryCheckpoint
from worker.loading import load_checkpoint, load_examples
from worker.tasks.options import dataclass_from


@dataclass
class LoadedTrajectory:
    checkpoints: list[TrajectoryCheckpoint]
    stage_data: dict[int, Examples]
    attributed_stages: list[int]


def compute_source_or_tracin(request: Any, context: Any) -> AttributionScores:
    """``request`` is worker.tasks.attribution.LoadedRequest, ``context`` a JobContext."""
    attribution: Attribution = request.attribution
    with context.session() as session:
        trajectory = load_trajectory(session, context.store, attribution, request.models[0], request.train)
    if attribution.method == "tracin":
        chosen = [c for c in trajectory.checkpoints if c.stage in trajectory.attributed_stages]
        return attribute_tracin(
            chosen, request.train, request.query, loss=request.loss, mode=attribution.mode,
            measurement=attribution.measurement, top_k=attribution.top_k,
            options=dataclass_from(TracInOptions, attribution.options), progress=context.progress,
        )
    return attribute_source(
        request.modules[0], trajectory.checkpoints, trajectory.stage_data, request.train, request.query,
        loss=request.loss, mode=attribution.mode, measurement=attribution.measurement, top_k=attribution.top_k,
        options=source_options(attribution.options), attributed_stages=trajectory.attributed_stages,
        progress=context.progress,
    )


def edit_source(
    session: Session, store: BlobStore, attribution: Attribution, model_row: Model, module: nn.Module,
    train: Examples, removed_indices: torch.Tensor, options: EditOptions, queries: Examples | None,
    progress: Progress,
) -> EditResult:
    """``first_order``: the final weights moved by SOURCE's own unrolled estimate of removing ``removed_indices``
    (rows of the train set); ``newton`` / ``proximal``: the retrain objective at the final weights."""
    loss = model_row.task["loss"]
    if options.estimator != "first_order":
        return retrain_objective_edit(module, train, removed_indices, loss=loss, edit=options, queries=queries,
                                      progress=progress)
    trajectory = load_trajectory(session, store, attribution, model_row, train)
    state = engine_edit_source(
        module, trajectory.checkpoints, trajectory.stage_data, train, removed_indices, loss=loss,
        options=source_options(attribution.options), attributed_stages=trajectory.attributed_stages,
    )
    return assess_edit(module, state, train, removed_indices, loss, options, queries=queries)


def source_options(values: dict[str, Any]) -> SourceOptions:
    return dataclass_from(SourceOptions, values)


def load_trajectory(
    session: Session, store: BlobStore, attribution: Attribution, model_row: Model, train: Examples
) -> LoadedTrajectory:
    rows = list(session.scalars(
        select(Checkpoint).where(Checkpoint.model_id == model_row.id).order_by(Checkpoint.stage, Checkpoint.step)
    ))
    if not rows:
        raise AttributionError(f"model {model_row.id!r} has no training checkpoint")
    checkpoints = [
        TrajectoryCheckpoint(load_checkpoint(store, model_row, row), row.step, row.learning_rate, row.momentum,
                             row.stage, getattr(row, "optimizer", None) or "sgd", row.id)
        for row in rows
    ]
    stages = sorted({row.stage for row in rows})
    dataset_ids = stage_dataset_ids(attribution, stages)
    loaded: dict[str, Examples] = {attribution.train_dataset_id: train}
    for dataset_id in set(dataset_ids.values()) - set(loaded):
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise AttributionError(f"the training dataset {dataset_id!r} of a stage no longer exists")
        loaded[dataset_id] = load_examples(store, dataset)[0]
    stage_data = {stage: loaded[dataset_ids[stage]] for stage in stages}
    return LoadedTrajectory(checkpoints, stage_data, attributed_stages(attribution, dataset_ids))


def stage_dataset_ids(attribution: Attribution, stages: list[int]) -> dict[int, str]:
    given = attribution.options.get("stage_datasets") or {}
    return {stage: given.get(str(stage), attribution.train_dataset_id) for stage in stages}


def attributed_stages(attribution: Attribution, dataset_ids: dict[int, str]) -> list[int]:
    chosen = attribution.options.get("stages")
    if chosen is None:
        chosen = [stage for stage, dataset_id in dataset_ids.items() if dataset_id == attribution.train_dataset_id]
    if not chosen:
        raise AttributionError("no stage trains on train_dataset_id: name the attributed stages in options.stages")
    other = [s for s in chosen if dataset_ids.get(s) != attribution.train_dataset_id]
    if other:
        raise AttributionError(f"stage(s) {other} train on another dataset than train_dataset_id")
    return sorted(chosen)
