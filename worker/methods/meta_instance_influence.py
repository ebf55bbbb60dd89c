"""Method `meta_instance_influence`: the influence of single training instances (an example of one task's
train or validation split) of a meta-learned model, first order: Δλ = (H + ρI)⁻¹ g_i, scored on the query
tasks' post-adaptation loss. Rows rank examples and carry their task and split."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field

from service.schemas.diagnostics import MetaInstanceInfluenceDiagnostics
from worker.methods.base import EditInputs, EditSupport, Method, RunInputs, RunOutput
from worker.methods.meta_common import MetaOptionsBase, edit_meta, run_meta

if TYPE_CHECKING:
    from worker.attribution import EditResult


class MetaInstanceInfluenceOptions(MetaOptionsBase):
    """Options of method `meta_instance_influence`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"solver": "cg", "inner": {"mode": "implicit_proximal", "reg": 1.0}}]}
    )

    removal: Literal["first_order"] = Field(
        "first_order",
        description="Instance removal is first order, Δλ = (H + ρI)⁻¹ g_i (`newton` applies to meta_task_influence).",
    )


def run(inputs: RunInputs) -> RunOutput:
    return run_meta(inputs, "instance")


def edit(inputs: EditInputs) -> EditResult:
    return edit_meta(inputs, "instance")


METHOD = Method(
    name="meta_instance_influence",
    summary="Instance influence of a meta-learned model on the query tasks' post-adaptation loss.",
    options=MetaInstanceInfluenceOptions,
    diagnostics=MetaInstanceInfluenceDiagnostics,
    run=run,
    modes=("pairwise", "aggregate"),
    measurements=("loss",),
    needs_meta_datasets=True,
    query_unit="task",
    edit=EditSupport(
        run=edit,
        estimators=("first_order", "proximal"),
        default_estimator="first_order",
        estimator_note="estimator 'newton' (a solve with H − Σ H_k) applies to task influence; meta instance "
        "influence supports 'first_order' and 'proximal'",
    ),
)
