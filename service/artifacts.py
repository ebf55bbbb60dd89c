"""Service-side use of the artifact layer: upload validation (tenant-scoped lookups: `service.ownership`)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from service.db.tables import Checkpoint, Model
from service.problems import ProblemError, invalid
from service.schemas.models import ModelMetadata
from worker.artifacts.spec import SequentialSpec, build_module, count_parameters, parse_architecture
from worker.artifacts.spec import parameter_count as module_parameter_count
from worker.artifacts.weights import load_weights
from worker.attribution import trackable_layers


def check_model_metadata(meta: ModelMetadata, max_parameters: int) -> SequentialSpec:
    if meta.format != "spec":
        raise invalid(f"model format {meta.format!r} is not supported yet; use \"spec\"", "metadata.format")
    if meta.task.loss == "causal_lm":
        raise invalid("task loss \"causal_lm\" is not supported yet", "metadata.task.loss")
    spec = parse_architecture(meta.architecture)
    count = count_parameters(spec)
    if count > max_parameters:
        raise invalid(
            f"the architecture has {count} parameters, over the limit of {max_parameters}", "metadata.architecture"
        )
    return spec


def load_model(spec: SequentialSpec, weights_path: Path) -> nn.Module:
    module = build_module(spec)
    load_weights(module, weights_path, field="weights")
    return module


def parameter_count(module: nn.Module) -> int:
    return module_parameter_count(module)


def tracked_layers(module: nn.Module) -> list[str]:
    return trackable_layers(module)


def model_spec(model: Model) -> SequentialSpec:
    return parse_architecture(model.architecture)


def check_checkpoint_is_new(session: Session, model_id: str, step: int, stage: int) -> None:
    existing = session.scalar(
        select(Checkpoint.id).where(Checkpoint.model_id == model_id, Checkpoint.step == step, Checkpoint.stage == stage)
    )
    if existing is not None:
        raise ProblemError(409, f"the model already has checkpoint {existing!r} at step {step} of stage {stage}",
                           kind="conflict")
