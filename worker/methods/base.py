"""What a method declares: its name, options model, inputs, modes, how it runs, how it edits, how rows are labelled.

A `Method` is a frozen declaration. The service reads the declarative fields (options model, inputs, modes) to
check a request before queuing it; the worker calls `run` and `edit.run` with what the job loaded. The callables
import the engine (`worker.attribution`) lazily, so that importing a declaration stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from service.schemas.common import StrictModel
from service.schemas.diagnostics import Diagnostics, OtherMethodDiagnostics

if TYPE_CHECKING:
    import torch
    from torch import nn

    from worker.attribution import (
        AttributionScores,
        Curvature,
        CurvatureScale,
        EditOptions,
        EditResult,
        Examples,
        Progress,
    )
    from worker.attribution.losses import LossName
    from worker.attribution.trajectory import TrajectoryCheckpoint

ModeName = Literal["pairwise", "aggregate", "self"]
MeasurementName = Literal["loss", "margin"]
# What a ranked row's train_id (or a query row's query_id) names: a dataset example (its id) or a task (its task id).
Unit = Literal["example", "task"]
EstimatorName = Literal["newton", "proximal", "first_order"]

ALL_MODES: tuple[ModeName, ...] = ("pairwise", "aggregate", "self")
ALL_MEASUREMENTS: tuple[MeasurementName, ...] = ("loss", "margin")
ALL_ESTIMATORS: tuple[EstimatorName, ...] = ("newton", "proximal", "first_order")


class MethodInputError(ValueError):
    """A request a method cannot serve, found from what is known before queuing (or, in a job, from the stored
    request): the service answers it with a 422 naming ``field``, a job fails with it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class CheckpointFacts:
    """What the service knows about one uploaded training checkpoint of the model."""

    stage: int
    step: int
    optimizer: str


@dataclass(frozen=True)
class Trajectory:
    """The model's training checkpoints with each stage's training data, and the stages being attributed."""

    checkpoints: list[TrajectoryCheckpoint]
    stage_data: dict[int, Examples]
    attributed_stages: list[int]


@dataclass(frozen=True)
class RunInputs:
    """What the attribution job loaded for a method: the typed options, the modules and data, and the extra
    inputs the method declared (the stored fit, the trajectory)."""

    options: StrictModel
    model_ids: list[str]
    modules: list[nn.Module]
    train: Examples
    query: Examples | None
    loss: LossName
    mode: ModeName
    measurement: MeasurementName
    top_k: int
    progress: Progress
    fit: Curvature | None = None
    trajectory: Trajectory | None = None
    device: torch.device | None = None  # the worker's device (None: the engine's default)


@dataclass(frozen=True)
class MadeFit:
    """A curvature a run fitted on the way (influence with a factor strategy): stored as a fit for reuse and
    editing, with what it was made with."""

    model_id: str
    curvature: Curvature
    settings: StrictModel
    damping: float | None


@dataclass(frozen=True)
class RunOutput:
    scores: AttributionScores
    made_fits: list[MadeFit] = field(default_factory=list)


@dataclass(frozen=True)
class EditInputs:
    """What the edit job loaded: the attribution's typed options, the model, the removed units (rows of the
    training set, or task ids when the method ranks tasks) and the engine's edit options. ``curvature_scale``: the
    one an earlier edit of the same attribution computed (methods whose λ is set from it reuse it)."""

    options: StrictModel
    module: nn.Module
    train: Examples
    removed: torch.Tensor
    loss: LossName
    edit: EditOptions
    queries: Examples | None
    progress: Progress
    fit: Curvature | None
    trajectory: Callable[[], Trajectory]
    device: torch.device | None = None  # the worker's device (None: the engine's default)
    curvature_scale: CurvatureScale | None = None


@dataclass(frozen=True)
class EditSupport:
    """How a method turns its attribution into an edited model."""

    run: Callable[[EditInputs], EditResult]
    estimators: tuple[EstimatorName, ...] = ALL_ESTIMATORS
    default_estimator: EstimatorName = "newton"
    # Said when an estimator outside ``estimators`` is asked for.
    estimator_note: str = ""


@dataclass(frozen=True)
class Method:
    """One attribution method, declared in one place (see docs/methods.md, "Adding a method")."""

    name: str
    summary: str
    options: type[StrictModel]
    run: Callable[[RunInputs], RunOutput]
    # Every mode but `self` takes a query dataset (query_dataset_id); `self` takes none.
    modes: tuple[ModeName, ...] = ALL_MODES
    measurements: tuple[MeasurementName, ...] = ALL_MEASUREMENTS
    # Inputs: checkpoints (trajectory methods take one model and its uploaded checkpoints), meta-datasets (every
    # dataset has `task` and `split` fields), a stored fit (fit_id).
    needs_checkpoints: bool = False
    needs_meta_datasets: bool = False
    accepts_fit: bool = False
    # Row labelling: what train_id and query_id name.
    train_unit: Unit = "example"
    query_unit: Unit = "example"
    edit: EditSupport | None = None
    # Why an attribution of this method cannot be edited (said when an edit is asked for).
    not_editable: str = ""
    # What a finished job of this method reports (`service/schemas/diagnostics.py`): the worker reads the engine's
    # diagnostics through this model before storing them.
    diagnostics: type[Diagnostics] = OtherMethodDiagnostics
    # Method-specific checks of the checkpoints before queuing (raise MethodInputError).
    check_checkpoints: Callable[[StrictModel, Sequence[CheckpointFacts]], None] | None = None
