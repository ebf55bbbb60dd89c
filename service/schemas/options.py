"""Method options of `POST /v1/attributions` and fit options of `POST /v1/fits`.

Each method has its own strict model: an unknown option is a 422, never silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from service.schemas.common import StrictModel

FitStrategy = Literal["ekfac", "kfac", "diagonal", "identity"]
FisherKind = Literal["true", "empirical"]


def _normalise_fisher(value: object) -> object:
    # API.md: `fisher` is `true` (labels sampled from the model) or `empirical` (the given labels).
    return "true" if value is True else value


class FitLevelOptions(StrictModel):
    """Options that decide what a curvature fit contains."""

    fisher: FisherKind = Field("true", description="`true`: labels sampled from the model; `empirical`: the given labels.")
    fisher_samples: int = Field(1, ge=1, le=64, description="Sampled labels per example (true Fisher).")
    seed: int = Field(0, ge=0, description="Seed of the label sampling.")
    layers: list[str] | None = Field(None, description="Module names to track; default every Linear and Conv2d.")

    _fisher = field_validator("fisher", mode="before")(_normalise_fisher)


class InfluenceOptions(FitLevelOptions):
    strategy: Literal["ekfac", "kfac", "diagonal", "identity", "exact", "cg", "lissa"] = "ekfac"
    damping: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Added to every layer's eigenvalues; null: 0.1 × mean eigenvalue per layer "
        "(exact/cg/lissa: 0.1 × trace/D).",
    )
    curvature: Literal["gauss_newton", "hessian"] = Field("gauss_newton", description="For exact/cg/lissa.")
    max_iter: int = Field(100, ge=1, le=100_000, description="For cg/lissa.")
    tol: float = Field(1e-6, gt=0, lt=1, description="For cg.")
    batch_size: int = Field(256, ge=1, le=65_536)


class DataInfOptions(StrictModel):
    damping: float | None = Field(None, gt=0, allow_inf_nan=False, description="λ per layer; null: 0.1 × mean ‖g‖²/d.")
    layers: list[str] | None = None
    batch_size: int = Field(256, ge=1, le=65_536)


class GradientSimilarityOptions(StrictModel):
    layers: list[str] | None = None
    batch_size: int = Field(256, ge=1, le=65_536)
    normalize: bool = Field(False, description="Cosine of the gradients instead of their dot product.")


class TracInOptions(StrictModel):
    """TracInCP: Σ over the chosen stages' checkpoints of learning rate × ⟨∇f(z_q), ∇ℓ(z_i)⟩, with the learning
    rate as uploaded (momentum is not folded in). `self` mode: Σ_c η_c ‖∇ℓ(z_i)‖²."""

    layers: list[str] | None = None
    batch_size: int = Field(256, ge=1, le=65_536)
    stages: list[int] | None = Field(
        None, description="Stages whose checkpoints are summed; default: the stages trained on train_dataset_id.")
    stage_datasets: dict[str, str] | None = Field(
        None, description="Training dataset id of each stage (`{\"0\": id}`); default: train_dataset_id.")


class SourceOptions(FitLevelOptions):
    """SOURCE (segmented stationary unrolling). Rows rank the examples of `train_dataset_id`; each stage's
    training data (its curvature and its N) come from `stage_datasets`. `self` mode: Σ over the attributed
    segments of ⟨ḡ_s, U_s ḡ_s⟩ (no forgetting factors of later segments)."""

    segments: int | Literal["stages"] | None = Field(
        None, description="k = k equal parts of the run by step (also cut where the stage changes, so a "
        "segment never mixes two datasets), or `stages` (one per stage). Default: one per stage when there are "
        "several stages, else 3 (at most one per checkpoint).",
    )
    stages: list[int] | None = Field(
        None, description="Stages whose segments are attributed; default: the stages trained on train_dataset_id.")
    stage_datasets: dict[str, str] | None = Field(
        None, description="Training dataset id of each stage (`{\"0\": id, \"1\": id}`); default: "
        "`train_dataset_id` for every stage.",
    )
    variant: Literal["full", "averaged_parameters"] = Field(
        "full", description="`full`: factors and gradients per checkpoint, averaged in each segment; "
        "`averaged_parameters`: one fit per segment at its checkpoints' mean parameters.")
    damping: float | None = Field(None, gt=0, allow_inf_nan=False, description="Added to the eigenvalues (default none).")
    batch_size: int = Field(256, ge=1, le=65_536)


class MetaInnerOptions(StrictModel):
    mode: Literal["implicit_proximal", "unrolled"] = "implicit_proximal"
    reg: float = Field(1.0, gt=0, allow_inf_nan=False, description="Proximal regulariser r (implicit_proximal).")
    steps: int = Field(5, ge=1, le=1000, description="Inner gradient steps K (unrolled).")
    lr: float = Field(0.1, gt=0, allow_inf_nan=False, description="Inner step size α (unrolled).")
    ihvp: Literal["dense", "cg", "ekfac"] = "cg"
    tol: float = Field(1e-6, gt=0)
    max_iter: int = Field(100, ge=1, le=100_000)


class MetaOptions(StrictModel):
    inner: MetaInnerOptions = Field(default_factory=MetaInnerOptions)
    outer_l2: float = Field(0.0, ge=0, allow_inf_nan=False, description="δ_o of the outer objective.")
    solver: Literal["exact", "cg", "neumann"] = "cg"
    third_order: Literal["exact", "gamma", "drop"] = "exact"
    damping: float | None = Field(None, gt=0, allow_inf_nan=False, description="ρ; null: auto (META.md §3.2).")
    direct: bool = Field(False, description="Direct-IF baseline: total-gradient correction switched off.")
    removal: Literal["first_order", "newton"] = Field(
        "first_order", description="Task removal: `first_order` Δλ = (H + ρI)⁻¹ g_k (the paper's task-IF); `newton` "
        "Δλ = (H − H_k + ρI)⁻¹ g_k, the Newton step of the proximal leave-one-task-out retrain (one solve per task; "
        "solver `exact` or `cg`; task influence only).")
    adapted_params: list[str] | None = Field(None, description="Parameters adapted in the inner loop; default all.")
    neumann_steps: int = Field(1000, ge=1, le=1_000_000)
    max_iter: int = Field(200, ge=1, le=100_000)
    tol: float = Field(1e-8, gt=0)


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
