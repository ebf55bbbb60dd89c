"""Stored request options re-read through the same models that validated them in the service.

Nothing is dropped: a stored option the model no longer knows (or a value it no longer accepts) fails the job
with an error that says so. The typed options become the engine's dataclasses in `worker.methods.engine_options`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from service.schemas.attributions import EditOptionsIn
from service.schemas.common import StrictModel
from service.schemas.options import FitSettings
from worker.attribution import AttributionError
from worker.attribution.losses import LossName
from worker.attribution.losses import loss_name as engine_loss_name
from worker.methods.base import MeasurementName, Method, ModeName
from worker.methods.registry import UnknownMethod, get_method

ModelT = TypeVar("ModelT", bound=BaseModel)


def read_stored(model: type[ModelT], stored: dict[str, Any], what: str) -> ModelT:
    try:
        return model.model_validate(stored)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(options)'}: {e['msg']}" for e in exc.errors())
        raise AttributionError(
            f"the stored {what} no longer fit this service's options model {model.__name__}: {problems}"
        ) from exc


def method_of(name: str) -> Method:
    """The registered method of a stored request; a job of a method this worker does not know fails with a 422."""
    try:
        return get_method(name)
    except UnknownMethod:
        raise AttributionError(f"method {name!r} is not known to this worker") from None


def method_options(method: Method, stored: dict[str, Any]) -> StrictModel:
    return read_stored(method.options, stored, f"options of method {method.name!r}")


def fit_settings(stored: dict[str, Any]) -> FitSettings:
    return read_stored(FitSettings, stored, "options of the fit")


def edit_options(stored: dict[str, Any]) -> EditOptionsIn:
    return read_stored(EditOptionsIn, stored, "options of the edit")


def loss_name(value: object) -> LossName:
    """The stored task loss as the engine's loss name (an AttributionError, failing the job, if unknown)."""
    return engine_loss_name(str(value))


MODES: dict[str, ModeName] = {"pairwise": "pairwise", "aggregate": "aggregate", "self": "self"}
MEASUREMENTS: dict[str, MeasurementName] = {"loss": "loss", "margin": "margin"}


def mode_name(value: str) -> ModeName:
    mode = MODES.get(value)
    if mode is None:
        raise AttributionError(f"unknown mode {value!r}")
    return mode


def measurement_name(value: str) -> MeasurementName:
    measurement = MEASUREMENTS.get(value)
    if measurement is None:
        raise AttributionError(f"unknown measurement {value!r}")
    return measurement
