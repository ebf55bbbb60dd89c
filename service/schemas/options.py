"""Method options of `POST /v1/attributions` and fit options of `POST /v1/fits`.

Each method has its own strict model: an unknown option is a 422, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictFloat, StrictInt, StrictStr, field_validator

from service.schemas.common import BatchSize, Damping, Flag, Iterations, ModuleNames, Seed, StrictModel, Tolerance

FitStrategy = Literal["ekfac", "kfac", "diagonal", "identity"]
FisherKind = Literal["true", "empirical"]


Stages = Annotated[list[Annotated[StrictInt, Field(ge=0, le=10_000)]], Field(min_length=1, max_length=1000)]
StageDatasets = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]{1,5}$")], Annotated[StrictStr, Field(min_length=1, max_length=64)]],
    Field(min_length=1, max_length=1000),
]


def _normalise_fisher(value: object) -> object:
    # API.md: `fisher` is `true` (labels sampled from the model) or `empirical` (the given labels).
    return "true" if value is True else value


class FitLevelOptions(StrictModel):
    """Options that decide what a curvature fit contains."""

    fisher: FisherKind = Field("true", description="`true`: labels sampled from the model; `empirical`: the given labels.")
    fisher_samples: StrictInt = Field(1, ge=1, le=64, description="Sampled labels per example (true Fisher).")
    seed: Seed = Field(0, description="Seed of the label sampling.")
    layers: ModuleNames | None = Field(None, description="Module names to track; default every Linear and Conv2d.")

    _fisher = field_validator("fisher", mode="before")(_normalise_fisher)


class InfluenceOptions(FitLevelOptions):
    strategy: Literal["ekfac", "kfac", "diagonal", "identity", "exact", "cg", "lissa"] = "ekfac"
    damping: Damping | None = Field(
        None,
        description="Added to every layer's eigenvalues; null: 0.1 × mean eigenvalue per layer "
        "(exact/cg/lissa: 0.1 × trace/D).",
    )
    curvature: Literal["gauss_newton", "hessian"] = Field("gauss_newton", description="For exact/cg/lissa.")
    max_iter: Iterations = Field(100, description="For cg/lissa.")
    tol: Tolerance = Field(1e-6, description="For cg.")
    batch_size: BatchSize = 256


class DataInfOptions(StrictModel):
    damping: Damping | None = Field(None, description="λ per layer; null: 0.1 × mean ‖g‖²/d.")
    layers: ModuleNames | None = None
    batch_size: BatchSize = 256


class GradientSimilarityOptions(StrictModel):
    layers: ModuleNames | None = None
    batch_size: BatchSize = 256
    normalize: Flag = Field(False, description="Cosine of the gradients instead of their dot product.")


class TracInOptions(StrictModel):
    """TracInCP: Σ over the chosen stages' checkpoints of learning rate × ⟨∇f(z_q), ∇ℓ(z_i)⟩, with the learning
    rate as uploaded (momentum is not folded in). `self` mode: Σ_c η_c ‖∇ℓ(z_i)‖²."""

    layers: ModuleNames | None = None
    batch_size: BatchSize = 256
    stages: Stages | None = Field(
        None, description="Stages whose checkpoints are summed; default: the stages trained on train_dataset_id.")
    stage_datasets: StageDatasets | None = Field(
        None, description="Training dataset id of each stage (`{\"0\": id}`); default: train_dataset_id.")


class SourceOptions(FitLevelOptions):
    """SOURCE (segmented stationary unrolling). Rows rank the examples of `train_dataset_id`; each stage's
    training data (its curvature and its N) come from `stage_datasets`. `self` mode: Σ over the attributed
    segments of ⟨ḡ_s, U_s ḡ_s⟩ (no forgetting factors of later segments)."""

    segments: Annotated[StrictInt, Field(ge=1, le=10_000)] | Literal["stages"] | None = Field(
        None, description="k = k equal parts of the run by step (also cut where the stage changes, so a "
        "segment never mixes two datasets), or `stages` (one per stage). Default: one per stage when there are "
        "several stages, else 3 (at most one per checkpoint).",
    )
    stages: Stages | None = Field(
        None, description="Stages whose segments are attributed; default: the stages trained on train_dataset_id.")
    stage_datasets: StageDatasets | None = Field(
        None, description="Training dataset id of each stage (`{\"0\": id, \"1\": id}`); default: "
        "`train_dataset_id` for every stage.",
    )
    variant: Literal["full", "averaged_parameters"] = Field(
        "full", description="`full`: factors and gradients per checkpoint, averaged in each segment; "
        "`averaged_parameters`: one fit per segment at its checkpoints' mean parameters.")
    damping: Damping | None = Field(None, description="Added to the eigenvalues (default none).")
    batch_size: BatchSize = 256


class MetaInnerOptions(StrictModel):
    mode: Literal["implicit_proximal", "unrolled"] = "implicit_proximal"
    reg: Damping = Field(1.0, description="Proximal regulariser r (implicit_proximal).")
    steps: StrictInt = Field(5, ge=1, le=1000, description="Inner gradient steps K (unrolled).")
    lr: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1e3, allow_inf_nan=False)] = Field(
        0.1, description="Inner step size α (unrolled).")
    ihvp: Literal["dense", "cg", "ekfac"] = "cg"
    tol: Tolerance = 1e-6
    max_iter: Iterations = 100


class MetaOptions(StrictModel):
    inner: MetaInnerOptions = Field(default_factory=MetaInnerOptions)
    outer_l2: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1e8, allow_inf_nan=False)] = Field(
        0.0, description="δ_o of the outer objective.")
    solver: Literal["exact", "cg", "neumann"] = "cg"
    third_order: Literal["exact", "gamma", "drop"] = "exact"
    damping: Damping | None = Field(None, description="ρ; null: automatic (the smallest ρ that makes H + ρI safely "
                                    "positive definite).")
    direct: Flag = Field(False, description="Direct-IF baseline: total-gradient correction switched off.")
    removal: Literal["first_order", "newton"] = Field(
        "first_order", description="Task removal: `first_order` Δλ = (H + ρI)⁻¹ g_k (the paper's task-IF); `newton` "
        "Δλ = (H − H_k + ρI)⁻¹ g_k, the Newton step of the proximal leave-one-task-out retrain (one solve per task; "
        "solver `exact` or `cg`; task influence only).")
    adapted_params: ModuleNames | None = Field(None, description="Parameters adapted in the inner loop; default all.")
    neumann_steps: StrictInt = Field(1000, ge=1, le=1_000_000)
    max_iter: Iterations = 200
    tol: Tolerance = 1e-8


OPTIONS_BY_METHOD: dict[str, type[StrictModel]] = {
    "influence": InfluenceOptions,
    "datainf": DataInfOptions,
    "gradient_similarity": GradientSimilarityOptions,
    "tracin": TracInOptions,
    "source": SourceOptions,
    "meta_task_influence": MetaOptions,
    "meta_instance_influence": MetaOptions,
}

FIT_LEVEL_FIELDS = ("strategy", "fisher", "fisher_samples", "seed", "layers")
