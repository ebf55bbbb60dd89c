"""Method `tracin` (TracInCP): score(q, i) = Σ over the attributed stages' checkpoints c of η_c ⟨∇f_c(z_q), ∇ℓ_c(z_i)⟩,
with the learning rate η_c as uploaded (momentum is not folded in). `self` mode: Σ_c η_c ‖∇ℓ_c(z_i)‖²."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from service.schemas.common import BatchSize, ModuleNames
from service.schemas.diagnostics import TracInDiagnostics
from service.schemas.options import DEFAULT_BATCH_SIZE, TrajectoryOptions
from worker.methods.base import Method, RunInputs, RunOutput


class TracInOptions(TrajectoryOptions):
    """Options of method `tracin`. Checkpoints are the model's uploaded checkpoints of the attributed stages."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"stages": [1], "stage_datasets": {"0": "ds_pretrain", "1": "ds_finetune"}}]}
    )

    layers: ModuleNames | None = Field(None, description="Module names to track; default every Linear and Conv2d.")
    batch_size: BatchSize = Field(DEFAULT_BATCH_SIZE, description="Examples per forward/backward pass.")


def run(inputs: RunInputs) -> RunOutput:
    from worker.attribution.methods.tracin import attribute_tracin
    from worker.methods.engine_options import tracin_options

    assert isinstance(inputs.options, TracInOptions) and inputs.trajectory is not None
    trajectory = inputs.trajectory
    chosen = [c for c in trajectory.checkpoints if c.stage in trajectory.attributed_stages]
    scores = attribute_tracin(
        chosen,
        inputs.train,
        inputs.query,
        loss=inputs.loss,
        mode=inputs.mode,
        measurement=inputs.measurement,
        top_k=inputs.top_k,
        options=tracin_options(inputs.options),
        progress=inputs.progress,
    )
    return RunOutput(scores=scores)


METHOD = Method(
    name="tracin",
    summary="TracInCP: learning-rate-weighted gradient dot products summed over the training checkpoints.",
    options=TracInOptions,
    diagnostics=TracInDiagnostics,
    run=run,
    needs_checkpoints=True,
    not_editable="TracInCP gives no parameter-change estimate; edit a `source` or `influence` attribution",
)
