"""Service-side use of the artifact layer: ownership lookups (uploads are validated by the model formats,
worker.artifacts.formats, through service.model_uploads)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Checkpoint, Dataset, Model
from service.problems import ProblemError, not_found
from worker.artifacts.spec import SequentialSpec, parse_architecture


def model_spec(model: Model) -> SequentialSpec:
    return parse_architecture(model.architecture)


def owned_model(session: Session, tenant_id: str, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant_id or model.deleted_at is not None:
        raise not_found("model", model_id)
    return model


def owned_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id or dataset.deleted_at is not None:
        raise not_found("dataset", dataset_id)
    return dataset


def check_checkpoint_is_new(session: Session, model_id: str, step: int, stage: int) -> None:
    existing = session.scalar(
        select(Checkpoint.id).where(Checkpoint.model_id == model_id, Checkpoint.step == step, Checkpoint.stage == stage)
    )
    if existing is not None:
        raise ProblemError(409, f"the model already has checkpoint {existing!r} at step {step} of stage {stage}",
                           kind="conflict")
