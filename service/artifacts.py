"""Service-side use of the artifact layer (uploads are validated by the model formats, worker.artifacts.formats,
through service.model_uploads; tenant-scoped lookups: `service.ownership`)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Checkpoint, Model
from service.problems import ProblemError
from worker.artifacts.spec import SequentialSpec, parse_architecture


def model_spec(model: Model) -> SequentialSpec:
    return parse_architecture(model.architecture)


def check_checkpoint_is_new(session: Session, model_id: str, step: int, stage: int) -> None:
    existing = session.scalar(
        select(Checkpoint.id).where(Checkpoint.model_id == model_id, Checkpoint.step == step, Checkpoint.stage == stage)
    )
    if existing is not None:
        raise ProblemError(
            409, f"the model already has checkpoint {existing!r} at step {step} of stage {stage}", kind="conflict"
        )
