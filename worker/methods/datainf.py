"""Method `datainf`: influence with DataInf's closed-form inverse of each layer's damped rank-one Fisher terms,
(1/N) Σ_i (λ_l I + g_il g_ilᵀ)⁻¹, applied per layer (no fit)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ConfigDict, Field

from service.schemas.common import BatchSize, Damping, ModuleNames, StrictModel
from service.schemas.diagnostics import DataInfDiagnostics
from service.schemas.options import DEFAULT_BATCH_SIZE
from worker.methods.base import EditInputs, EditSupport, Method, RunInputs, RunOutput

if TYPE_CHECKING:
    from worker.attribution import EditResult


class DataInfOptions(StrictModel):
    """Options of method `datainf`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"damping": 0.01}]})

    damping: Damping | None = Field(None, description="λ per layer; null: 0.1 × mean ‖g‖²/d.")
    layers: ModuleNames | None = Field(None, description="Module names to track; default every Linear and Conv2d.")
    batch_size: BatchSize = Field(DEFAULT_BATCH_SIZE, description="Examples per forward/backward pass.")


def run(inputs: RunInputs) -> RunOutput:
    from worker.attribution import attribute
    from worker.methods.engine_options import datainf_options

    assert isinstance(inputs.options, DataInfOptions)
    scores = attribute(
        inputs.modules,
        inputs.train,
        inputs.query,
        loss=inputs.loss,
        method="datainf",
        mode=inputs.mode,
        measurement=inputs.measurement,
        top_k=inputs.top_k,
        options=datainf_options(inputs.options),
        progress=inputs.progress,
        device=inputs.device,
    )
    return RunOutput(scores=scores)


def edit(inputs: EditInputs) -> EditResult:
    from worker.attribution import edit_parameters
    from worker.methods.engine_options import datainf_options

    assert isinstance(inputs.options, DataInfOptions)
    return edit_parameters(
        inputs.module,
        inputs.train,
        inputs.removed,
        loss=inputs.loss,
        method="datainf",
        options=datainf_options(inputs.options),
        edit=inputs.edit,
        queries=inputs.queries,
        progress=inputs.progress,
        device=inputs.device,
        curvature_scale=inputs.curvature_scale,
    )


METHOD = Method(
    name="datainf",
    summary="DataInf: influence with a closed-form per-layer inverse of the damped per-example Fisher terms.",
    options=DataInfOptions,
    diagnostics=DataInfDiagnostics,
    run=run,
    edit=EditSupport(run=edit),
)
