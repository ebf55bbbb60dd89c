"""What the two meta-learning methods share: the options of the bilevel solve, and how they run and edit.

Meta methods rank the tasks (`meta_task_influence`) or the instances (`meta_instance_influence`) of a training
meta-dataset by their effect on the post-adaptation loss of the query tasks (docs/methods.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, StrictFloat, StrictInt

from service.schemas.common import Damping, Flag, Iterations, ModuleNames, StrictModel, Tolerance
from worker.methods.base import EditInputs, RunInputs, RunOutput

if TYPE_CHECKING:
    from worker.attribution import EditResult
    from worker.attribution.losses import LossName

MetaUnit = Literal["task", "instance"]


class MetaInnerOptions(StrictModel):
    """The inner (adaptation) problem of a meta method."""

    mode: Literal["implicit_proximal", "unrolled"] = Field(
        "implicit_proximal",
        description="`implicit_proximal`: the proximal inner problem's solution, "
        "differentiated implicitly; `unrolled`: K inner gradient steps, differentiated through.",
    )
    reg: Damping = Field(1.0, description="Proximal regulariser r (implicit_proximal).")
    steps: StrictInt = Field(5, ge=1, le=1000, description="Inner gradient steps K (unrolled).")
    lr: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1e3, allow_inf_nan=False)] = Field(
        0.1, description="Inner step size α (unrolled)."
    )
    ihvp: Literal["dense", "cg", "ekfac"] = Field("cg", description="Inner inverse-Hessian products (implicit).")
    tol: Tolerance = Field(1e-6, description="Inner stationarity and CG tolerance.")
    max_iter: Iterations = Field(100, description="Inner Newton / CG iterations.")


class MetaOptionsBase(StrictModel):
    """Options of the meta methods' total-Hessian solve."""

    inner: MetaInnerOptions = Field(default_factory=MetaInnerOptions, description="The inner (adaptation) problem.")
    outer_l2: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1e8, allow_inf_nan=False)] = Field(
        0.0, description="δ_o of the outer objective."
    )
    removal: Literal["first_order", "newton"] = "first_order"
    solver: Literal["exact", "cg", "neumann"] = Field("cg", description="The total-Hessian solve.")
    third_order: Literal["exact", "gamma", "drop"] = Field(
        "exact", description="Third-order terms of the total Hessian: exact, a γ-scaled estimate, or dropped."
    )
    damping: Damping | None = Field(
        None, description="ρ; null: automatic (the smallest ρ that makes H + ρI safely positive definite)."
    )
    direct: Flag = Field(False, description="Direct-IF baseline: total-gradient correction switched off.")
    adapted_params: ModuleNames | None = Field(None, description="Parameters adapted in the inner loop; default all.")
    neumann_steps: StrictInt = Field(
        1000, ge=1, le=1_000_000, description="Terms of the Neumann series (solver `neumann`)."
    )
    max_iter: Iterations = Field(200, description="Total-Hessian CG iterations / power iterations bound.")
    tol: Tolerance = Field(1e-8, description="Relative residual of the total-Hessian solve.")


def meta_loss(loss: LossName) -> Literal["cross_entropy", "mse"]:
    """Meta-learning models are classifiers or regressors (a job on a causal LM fails with this reason)."""
    if loss == "causal_lm":
        from worker.attribution import AttributionError

        raise AttributionError("meta methods take models with task loss cross_entropy or mse, not causal_lm")
    return loss


def run_meta(inputs: RunInputs, unit: MetaUnit) -> RunOutput:
    from worker.attribution.meta import attribute_meta
    from worker.methods.engine_options import meta_options

    assert isinstance(inputs.options, MetaOptionsBase) and inputs.query is not None
    assert inputs.mode != "self"  # the declaration has no self mode
    scores = attribute_meta(
        inputs.modules[0],
        inputs.train,
        inputs.query,
        loss=meta_loss(inputs.loss),
        unit=unit,
        mode=inputs.mode,
        top_k=inputs.top_k,
        options=meta_options(inputs.options),
        progress=inputs.progress,
    )
    return RunOutput(scores=scores)


def edit_meta(inputs: EditInputs, unit: MetaUnit) -> EditResult:
    from worker.attribution.meta import edit_meta as engine_edit_meta
    from worker.methods.engine_options import meta_options

    assert isinstance(inputs.options, MetaOptionsBase)
    return engine_edit_meta(
        inputs.module,
        inputs.train,
        inputs.removed,
        loss=meta_loss(inputs.loss),
        unit=unit,
        options=meta_options(inputs.options),
        edit=inputs.edit,
        queries=inputs.queries,
    )
