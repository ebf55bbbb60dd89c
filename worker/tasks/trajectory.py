"""Loading the training trajectory of the methods that declare `needs_checkpoints` (``source``, ``tracin``).

Checkpoints are the model's rows of ``checkpoints`` (ordered by stage, step); the model's own weights are the
final parameters. Which stage trained on which dataset and which stages are attributed come from the method's
typed options through the one rule `worker.methods.stages.stage_plan`.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Attribution, Checkpoint, Dataset, Model
from service.schemas.common import StrictModel
from service.schemas.options import TrajectoryOptions
from service.storage import BlobStore
from worker.attribution import AttributionError, Examples
from worker.attribution.trajectory import TrajectoryCheckpoint
from worker.loading import load_checkpoint, load_examples
from worker.methods.base import MethodInputError, Trajectory
from worker.methods.stages import stage_plan


def load_trajectory(
    session: Session,
    store: BlobStore,
    attribution: Attribution,
    options: StrictModel,
    model_row: Model,
    train: Examples,
) -> Trajectory:
    if not isinstance(options, TrajectoryOptions):
        raise AttributionError(
            f"method {attribution.method!r} reads checkpoints but its options do not say which "
            "stages to attribute (they must extend TrajectoryOptions)"
        )
    rows = list(
        session.scalars(
            select(Checkpoint).where(Checkpoint.model_id == model_row.id).order_by(Checkpoint.stage, Checkpoint.step)
        )
    )
    if not rows:
        raise AttributionError(f"model {model_row.id!r} has no training checkpoint")
    checkpoints = [
        TrajectoryCheckpoint(
            load_checkpoint(store, model_row, row),
            row.step,
            row.learning_rate,
            row.momentum,
            row.stage,
            row.optimizer or "sgd",
            row.id,
        )
        for row in rows
    ]
    stages = sorted({row.stage for row in rows})
    try:
        plan = stage_plan(options, stages, attribution.train_dataset_id)
    except MethodInputError as exc:
        raise AttributionError(exc.message) from exc
    loaded: dict[str, Examples] = {attribution.train_dataset_id: train}
    for dataset_id in set(plan.dataset_of.values()) - set(loaded):
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise AttributionError(f"the training dataset {dataset_id!r} of a stage no longer exists")
        loaded[dataset_id] = load_examples(store, dataset)[0]
    stage_data = {stage: loaded[plan.dataset_of[stage]] for stage in stages}
    return Trajectory(checkpoints, stage_data, plan.attributed)
