"""Method `meta_task_influence`: the task influence function of a meta-learned model, Δλ = (H + ρI)⁻¹ g_k for
removing training task k (H: the total Hessian of the outer objective through the inner adaptation; g_k: task
k's total gradient), scored on the query tasks' post-adaptation loss. Rows rank tasks (train_id = task id)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field, model_validator

from service.schemas.diagnostics import MetaTaskInfluenceDiagnostics
from worker.methods.base import EditInputs, EditSupport, Method, RunInputs, RunOutput
from worker.methods.meta_common import MetaOptionsBase, edit_meta, run_meta

if TYPE_CHECKING:
    from worker.attribution import EditResult


class MetaTaskInfluenceOptions(MetaOptionsBase):
    """Options of method `meta_task_influence`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"solver": "cg", "removal": "newton", "inner": {"mode": "implicit_proximal", "reg": 1.0}}]
        }
    )

    removal: Literal["first_order", "newton"] = Field(
        "first_order",
        description="Task removal: `first_order` Δλ = (H + ρI)⁻¹ g_k (the paper's task-IF); `newton` "
        "Δλ = (H − H_k + ρI)⁻¹ g_k, the Newton step of the proximal leave-one-task-out retrain (one solve per task; "
        "needs solver `exact` or `cg`).",
    )

    @model_validator(mode="after")
    def _newton_needs_a_direct_solve(self) -> MetaTaskInfluenceOptions:
        if self.removal == "newton" and self.solver == "neumann":
            raise ValueError('options.removal "newton" needs solver "exact" or "cg" (not "neumann")')
        return self


def run(inputs: RunInputs) -> RunOutput:
    return run_meta(inputs, "task")


def edit(inputs: EditInputs) -> EditResult:
    return edit_meta(inputs, "task")


METHOD = Method(
    name="meta_task_influence",
    summary="Task influence of a meta-learned model on the query tasks' post-adaptation loss.",
    options=MetaTaskInfluenceOptions,
    diagnostics=MetaTaskInfluenceDiagnostics,
    run=run,
    modes=("pairwise", "aggregate"),
    measurements=("loss",),
    needs_meta_datasets=True,
    train_unit="task",
    query_unit="task",
    edit=EditSupport(run=edit),
)
