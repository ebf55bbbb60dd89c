"""Method `gradient_similarity`: score(q, i) = ⟨∇f(z_q), ∇ℓ(z_i)⟩ over the tracked layers (identity curvature),
or their cosine with `normalize`."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from service.schemas.common import BatchSize, Flag, ModuleNames, StrictModel
from service.schemas.diagnostics import GradientSimilarityDiagnostics
from service.schemas.options import DEFAULT_BATCH_SIZE
from worker.methods.base import Method, RunInputs, RunOutput


class GradientSimilarityOptions(StrictModel):
    """Options of method `gradient_similarity`."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"normalize": True}]})

    layers: ModuleNames | None = Field(None, description="Module names to track; default every Linear and Conv2d.")
    batch_size: BatchSize = Field(DEFAULT_BATCH_SIZE, description="Examples per forward/backward pass.")
    normalize: Flag = Field(False, description="Cosine of the gradients instead of their dot product.")


def run(inputs: RunInputs) -> RunOutput:
    from worker.attribution import attribute
    from worker.methods.engine_options import gradient_similarity_options

    assert isinstance(inputs.options, GradientSimilarityOptions)
    scores = attribute(
        inputs.modules,
        inputs.train,
        inputs.query,
        loss=inputs.loss,
        method="gradient_similarity",
        mode=inputs.mode,
        measurement=inputs.measurement,
        top_k=inputs.top_k,
        options=gradient_similarity_options(inputs.options),
        progress=inputs.progress,
        device=inputs.device,
    )
    return RunOutput(scores=scores)


METHOD = Method(
    name="gradient_similarity",
    summary="Dot product (or cosine) of the query's and the training example's loss gradients.",
    options=GradientSimilarityOptions,
    diagnostics=GradientSimilarityDiagnostics,
    run=run,
)
