"""Method `influence`: score(q, i) = ∇f(z_q)ᵀ (G + λI)⁻¹ ∇ℓ(z_i), with the curvature G approximated by a fit
(EK-FAC, K-FAC, diagonal, identity) or solved against exactly (exact, cg, LiSSA)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from pydantic import ConfigDict, Field

from service.schemas.common import BatchSize, Damping, Iterations, Tolerance
from service.schemas.diagnostics import InfluenceDiagnostics
from service.schemas.options import DEFAULT_BATCH_SIZE, FIT_STORED_FIELDS, FitLevelOptions, FitSettings
from worker.attribution.options import FIT_STRATEGIES, CurvatureKind, FitStrategy, InfluenceStrategy
from worker.methods.base import EditInputs, EditSupport, MadeFit, Method, RunInputs, RunOutput

if TYPE_CHECKING:
    from worker.attribution import EditResult


class InfluenceOptions(FitLevelOptions):
    """Options of method `influence`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"strategy": "ekfac", "damping": None, "fisher": "true", "batch_size": 256}]}
    )

    strategy: InfluenceStrategy = Field(
        "ekfac",
        description="Curvature: a fit (`ekfac`, `kfac`, `diagonal`, `identity`) or the tracked "
        "Gauss-Newton/Hessian itself (`exact`: dense solve; `cg`: conjugate gradients; `lissa`: LiSSA).",
    )
    damping: Damping | None = Field(
        None,
        description="Added to every layer's eigenvalues; null: 0.1 × mean eigenvalue per layer "
        "(exact/cg/lissa: 0.1 × trace/D).",
    )
    curvature: CurvatureKind = Field("gauss_newton", description="For exact/cg/lissa.")
    max_iter: Iterations = Field(100, description="For cg/lissa.")
    tol: Tolerance = Field(1e-6, description="For cg.")
    batch_size: BatchSize = Field(DEFAULT_BATCH_SIZE, description="Examples per forward/backward pass.")

    def fit_settings(self) -> FitSettings:
        """The fit-level part of these options (what a fit made by this attribution is stored with)."""
        return FitSettings.model_validate(self.model_dump(include=set(FIT_STORED_FIELDS)))


def run(inputs: RunInputs) -> RunOutput:
    from worker.attribution import Curvature, attribute, fit_curvature
    from worker.methods.engine_options import fit_options, influence_options

    options = inputs.options
    assert isinstance(options, InfluenceOptions)
    engine_options = influence_options(options)
    curvatures: list[Curvature] | None = None
    made: list[MadeFit] = []
    if inputs.fit is not None:
        curvatures = [inputs.fit]
        engine_options.strategy = cast(FitStrategy, inputs.fit.strategy)  # a stored fit has a factor strategy
    elif options.strategy in FIT_STRATEGIES:
        settings = options.fit_settings()
        curvatures = []
        for model_id, module in zip(inputs.model_ids, inputs.modules, strict=True):
            curvature = fit_curvature(
                module, inputs.train, inputs.loss, fit_options(settings), progress=inputs.progress, device=inputs.device
            )
            curvatures.append(curvature)
            made.append(MadeFit(model_id=model_id, curvature=curvature, settings=settings, damping=options.damping))
    scores = attribute(
        inputs.modules,
        inputs.train,
        inputs.query,
        loss=inputs.loss,
        method="influence",
        mode=inputs.mode,
        measurement=inputs.measurement,
        top_k=inputs.top_k,
        options=engine_options,
        fits=curvatures,
        progress=inputs.progress,
        device=inputs.device,
    )
    return RunOutput(scores=scores, made_fits=made)


def edit(inputs: EditInputs) -> EditResult:
    from worker.attribution import edit_parameters
    from worker.methods.engine_options import influence_options

    options = inputs.options
    assert isinstance(options, InfluenceOptions)
    engine_options = influence_options(options)
    if inputs.fit is not None:
        engine_options.strategy = cast(FitStrategy, inputs.fit.strategy)
    return edit_parameters(
        inputs.module,
        inputs.train,
        inputs.removed,
        loss=inputs.loss,
        method="influence",
        options=engine_options,
        fit=inputs.fit,
        edit=inputs.edit,
        queries=inputs.queries,
        progress=inputs.progress,
        device=inputs.device,
        curvature_scale=inputs.curvature_scale,
    )


METHOD = Method(
    name="influence",
    summary="Influence functions: ∇f(z_q)ᵀ (G + λI)⁻¹ ∇ℓ(z_i) with a fitted or exact curvature G.",
    options=InfluenceOptions,
    diagnostics=InfluenceDiagnostics,
    run=run,
    accepts_fit=True,
    edit=EditSupport(run=edit),
)
