"""Method `source` (SOURCE, segmented stationary unrolling): score(q, i) = Σ_s ⟨U_s E_{s+1} ⋯ E_M ∇f(z_q), ḡ_s(z_i)⟩
over the attributed segments s (ḡ_s: the example's mean gradient over the segment's checkpoints; U_s: the
segment's unrolled effect of its EK-FAC curvature; E_t: a later segment's forgetting factor). `self` mode:
Σ_s ⟨ḡ_s, U_s ḡ_s⟩ (no forgetting factors of later segments)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import ConfigDict, Field, StrictInt

from service.schemas.common import BatchSize, Damping, StrictModel
from service.schemas.diagnostics import SourceDiagnostics
from service.schemas.options import DEFAULT_BATCH_SIZE, FitLevelOptions, TrajectoryOptions
from worker.methods.base import CheckpointFacts, EditInputs, EditSupport, Method, MethodInputError, RunInputs, RunOutput

if TYPE_CHECKING:
    from worker.attribution import EditResult


class SourceOptions(FitLevelOptions, TrajectoryOptions):
    """Options of method `source`. Rows rank the examples of `train_dataset_id`; each stage's training data (its
    curvature and its N) come from `stage_datasets`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"segments": 3, "variant": "full", "damping": None}]})

    segments: Annotated[StrictInt, Field(ge=1, le=10_000)] | Literal["stages"] | None = Field(
        None,
        description="k = k equal parts of the run by step (also cut where the stage changes, so a "
        "segment never mixes two datasets), or `stages` (one per stage). Default: one per stage when there are "
        "several stages, else 3 (at most one per checkpoint).",
    )
    variant: Literal["full", "averaged_parameters"] = Field(
        "full",
        description="`full`: factors and gradients per checkpoint, averaged in each segment; "
        "`averaged_parameters`: one fit per segment at its checkpoints' mean parameters.",
    )
    damping: Damping | None = Field(None, description="Added to the eigenvalues (default none).")
    batch_size: BatchSize = Field(DEFAULT_BATCH_SIZE, description="Examples per forward/backward pass.")


def check_checkpoints(options: StrictModel, checkpoints: Sequence[CheckpointFacts]) -> None:
    assert isinstance(options, SourceOptions)
    adam = sorted({c.stage for c in checkpoints if c.optimizer != "sgd"})
    if adam:
        raise MethodInputError(
            f"the checkpoints of stage(s) {adam} were trained with an Adam-type optimizer: SOURCE supports SGD (with "
            "momentum) trajectories only; the diagonal approximation for Adam (appendix C of the SOURCE paper) is "
            'not implemented yet. Use method "tracin" or "influence"',
            "body.model_id",
        )
    if isinstance(options.segments, int):
        steps = len({(c.stage, c.step) for c in checkpoints})
        if options.segments > steps:
            raise MethodInputError(
                f"segments must be between 1 and the number of checkpoints ({steps}); {options.segments} would "
                "leave a segment with no checkpoint",
                "body.options.segments",
            )


def run(inputs: RunInputs) -> RunOutput:
    from worker.attribution.methods.source import attribute_source
    from worker.methods.engine_options import source_options

    assert isinstance(inputs.options, SourceOptions) and inputs.trajectory is not None
    trajectory = inputs.trajectory
    scores = attribute_source(
        inputs.modules[0],
        trajectory.checkpoints,
        trajectory.stage_data,
        inputs.train,
        inputs.query,
        loss=inputs.loss,
        mode=inputs.mode,
        measurement=inputs.measurement,
        top_k=inputs.top_k,
        options=source_options(inputs.options),
        attributed_stages=trajectory.attributed_stages,
        progress=inputs.progress,
    )
    return RunOutput(scores=scores)


def edit(inputs: EditInputs) -> EditResult:
    """``first_order``: the final weights moved by SOURCE's own unrolled estimate of removing the rows;
    ``newton`` / ``proximal``: the retrain objective at the final weights (no trajectory needed)."""
    from worker.attribution import assess_edit, retrain_objective_edit
    from worker.attribution.methods.source import edit_source
    from worker.methods.engine_options import source_options

    assert isinstance(inputs.options, SourceOptions)
    if inputs.edit.estimator != "first_order":
        return retrain_objective_edit(
            inputs.module,
            inputs.train,
            inputs.removed,
            loss=inputs.loss,
            edit=inputs.edit,
            queries=inputs.queries,
            progress=inputs.progress,
            curvature_scale=inputs.curvature_scale,
        )
    trajectory = inputs.trajectory()
    state = edit_source(
        inputs.module,
        trajectory.checkpoints,
        trajectory.stage_data,
        inputs.train,
        inputs.removed,
        loss=inputs.loss,
        options=source_options(inputs.options),
        attributed_stages=trajectory.attributed_stages,
    )
    return assess_edit(
        inputs.module,
        state,
        inputs.train,
        inputs.removed,
        inputs.loss,
        inputs.edit,
        queries=inputs.queries,
        curvature_scale=inputs.curvature_scale,
    )


METHOD = Method(
    name="source",
    summary="SOURCE: segmented stationary unrolling of the training run (SGD trajectories).",
    options=SourceOptions,
    diagnostics=SourceDiagnostics,
    run=run,
    needs_checkpoints=True,
    edit=EditSupport(run=edit),
    check_checkpoints=check_checkpoints,
)
