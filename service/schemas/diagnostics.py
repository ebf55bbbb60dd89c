"""What a finished job reports about how it computed its answer: one typed model per method, and one for edits.

The engine returns its diagnostics as JSON-ready values; the worker reads them through the method's model
(`Method.diagnostics`, see `read_diagnostics`) before storing them, so a key the model does not declare fails the
job instead of reaching users undocumented. Responses read the stored JSON back through the same models; they
ignore keys they do not know, so rows stored by an older release still read. Every field is optional for the same
reason: a model only grows.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# A damping: one value, one per tracked layer (factor strategies), or none (identity).
LayerDamping = float | dict[str, float] | None
QueryChunks = Annotated[int | None, Field(description="How many blocks of queries the scoring pass was split into.")]


class Diagnostics(BaseModel):
    """Stored diagnostics: read back leniently (unknown keys of older releases are dropped)."""

    model_config = ConfigDict(extra="ignore")


class UndeclaredDiagnostics(ValueError):
    """The engine reported keys that the method's diagnostics model does not declare (a programming error)."""


DiagnosticsT = TypeVar("DiagnosticsT", bound=Diagnostics)


def read_diagnostics(model: type[DiagnosticsT], raw: dict[str, object]) -> DiagnosticsT:
    """``raw`` (the engine's JSON-ready diagnostics) as ``model``, refusing keys the model does not declare (a
    model that allows extra keys declares them all)."""
    undeclared = sorted(set(raw) - set(model.model_fields))
    if undeclared and model.model_config.get("extra") != "allow":
        raise UndeclaredDiagnostics(f"{model.__name__} does not declare diagnostics {undeclared}")
    return model.model_validate(raw)


# ---------------------------------------------------------------- gradient-based methods on one or more models


class ScorerDiagnostics(Diagnostics):
    """How one model's training gradients were preconditioned and scored."""

    damping: LayerDamping = Field(None, description="The damping added to the curvature (per layer when fitted).")
    training_gradients: Literal["index", "recomputed"] | None = Field(
        None, description="Whether training gradients were kept in memory between query blocks or recomputed."
    )
    similarity: Literal["cosine", "dot_product"] | None = None
    curvature: str | None = Field(None, description="Exact solvers: the curvature (ggn or hessian).")
    solver: str | None = Field(None, description="Exact solvers: cholesky, cg or lissa.")
    iterations: int | list[int] | None = Field(None, description="Iterative solvers: iterations used.")
    max_relative_residual: float | None = None
    lissa_scale: float | None = None
    converged: bool | None = None
    training_passes: int | None = Field(
        None,
        description="DataInf: model passes over the training data its preconditioner ran (0 when the first pass's "
        "activities were kept).",
    )
    cached_training_activities: bool | None = Field(
        None, description="DataInf: whether the first pass's training activities were kept for scoring."
    )
    cached_activities_spilled: bool | None = Field(
        None, description="DataInf: whether the kept activities were large enough to live in mapped temporary files."
    )


class ScoredDiagnostics(Diagnostics):
    """Shared by the methods that score with per-model gradients (influence, DataInf, gradient similarity)."""

    mode: str | None = None
    measurement: str | None = None
    strategy: str | None = Field(None, description="The curvature strategy (influence).")
    num_models: int | None = Field(None, description="Models in the ensemble whose scores are averaged.")
    num_layers: int | None = None
    layers: list[str] | None = Field(None, description="The tracked layers.")
    num_parameters_tracked: int | None = None
    num_train: int | None = None
    num_queries: int | None = None
    scale: str | None = Field(None, description="What a score is, as a formula.")
    query_chunks: QueryChunks = None
    models: list[ScorerDiagnostics] | None = Field(None, description="One entry per model of the ensemble.")
    shards: int | None = Field(None, description="Sharded jobs: how many shards scored the training set.")
    shard_examples: int | None = Field(None, description="Sharded jobs: training examples in the largest shard.")


class InfluenceDiagnostics(ScoredDiagnostics):
    method: Literal["influence"] = "influence"


class DataInfDiagnostics(ScoredDiagnostics):
    method: Literal["datainf"] = "datainf"


class GradientSimilarityDiagnostics(ScoredDiagnostics):
    method: Literal["gradient_similarity"] = "gradient_similarity"


# ---------------------------------------------------------------- trajectory methods


class TracInCheckpoint(Diagnostics):
    stage: int | None = None
    step: int | None = None
    learning_rate: float | None = None
    name: str | None = None


class TracInDiagnostics(Diagnostics):
    method: Literal["tracin"] = "tracin"
    mode: str | None = None
    measurement: str | None = None
    layers: list[str] | None = None
    checkpoints: list[TracInCheckpoint] | None = Field(None, description="The checkpoints summed over.")
    num_train: int | None = None
    num_queries: int | None = None
    scale: str | None = None
    query_chunks: QueryChunks = None


class SegmentCheckpoint(Diagnostics):
    step: int | None = None
    name: str | None = None


class SourceSegment(Diagnostics):
    """One segment of the training trajectory and the spectrum of its fitted curvature."""

    index: int | None = None
    stage: int | None = None
    start_step: int | None = None
    end_step: int | None = None
    steps: int | None = None
    mean_learning_rate: float | None = None
    num_examples: int | None = None
    checkpoints: list[SegmentCheckpoint] | None = None
    horizon_eigenvalue_max: float | None = None
    horizon_eigenvalue_median: float | None = None


class SourceDiagnostics(Diagnostics):
    method: Literal["source"] = "source"
    mode: str | None = None
    measurement: str | None = None
    variant: str | None = None
    damping: float | None = None
    segments: list[SourceSegment] | None = None
    attributed_segments: list[int] | None = None
    layers: list[str] | None = None
    num_train: int | None = None
    num_queries: int | None = None
    scale: str | None = None
    self_mode: str | None = None
    query_chunks: QueryChunks = None


# ---------------------------------------------------------------- meta-learning


class MetaDiagnostics(Diagnostics):
    """The bi-level problem at the meta-parameters λ*, and how the total Hessian was inverted."""

    num_parameters: int | None = Field(None, description="Meta-parameters λ.")
    num_adapted_parameters: int | None = Field(None, description="Parameters the inner loop adapts.")
    num_train_tasks: int | None = None
    num_query_tasks: int | None = None
    dtype: str | None = None
    inner_mode: str | None = None
    total_gradient_norm: float | None = None
    median_task_gradient_norm: float | None = None
    stationarity_ratio: float | None = Field(
        None, description="‖∇F(λ*)‖ over the median task gradient norm: small when λ* is trained."
    )
    inner_residuals: list[float] | None = None
    inner_residual_max: float | None = None
    solver: str | None = None
    third_order: str | None = None
    direct: bool | None = None
    removal: str | None = None
    damping: float | None = None
    damping_rule: str | None = None
    lambda_min: float | None = None
    lambda_max: float | None = None
    gamma: float | None = None
    solver_iterations: list[int] | None = None
    solver_relative_residuals: list[float] | None = None
    warnings: list[str] = Field(default_factory=list)


class MetaTaskInfluenceDiagnostics(MetaDiagnostics):
    method: Literal["meta_task_influence"] = "meta_task_influence"


class MetaInstanceInfluenceDiagnostics(MetaDiagnostics):
    method: Literal["meta_instance_influence"] = "meta_instance_influence"


class OtherMethodDiagnostics(Diagnostics):
    """A method registered outside this package: its own diagnostics model, shown as an open object."""

    model_config = ConfigDict(extra="allow")

    method: str


BuiltInDiagnostics = Annotated[
    InfluenceDiagnostics
    | DataInfDiagnostics
    | GradientSimilarityDiagnostics
    | TracInDiagnostics
    | SourceDiagnostics
    | MetaTaskInfluenceDiagnostics
    | MetaInstanceInfluenceDiagnostics,
    Field(discriminator="method"),
]
AttributionDiagnostics = BuiltInDiagnostics | OtherMethodDiagnostics
_attribution_diagnostics: TypeAdapter[AttributionDiagnostics] = TypeAdapter(AttributionDiagnostics)


def stored_attribution_diagnostics(method: str, stored: dict[str, object] | None) -> AttributionDiagnostics | None:
    """An attribution's stored diagnostics as its method's model (rows of older releases lack ``method``)."""
    if stored is None:
        return None
    return _attribution_diagnostics.validate_python({**stored, "method": method})


# ---------------------------------------------------------------- edits


class EditSolverReport(Diagnostics):
    """How the edit's estimate was solved (`newton` and `proximal`; meta edits report their chord iterations)."""

    steps: int | None = None
    accepted_steps: int | None = None
    cg_iterations: list[int] | None = None
    gradient_norm_ratio: float | None = Field(None, description="‖∇J‖ at the answer over ‖∇J‖ at the start.")
    converged: bool | None = None
    line_search_step: float | None = Field(None, description="The scale of the Newton step taken (1: all of it).")
    line_search_boundary: float | None = Field(
        None, description="`boundary` line search: the edge of the acceptable scales it found (0: none)."
    )
    clipped_to_trust_radius: bool | None = None
    further_step_scales: list[float] | None = Field(
        None,
        description="`newton`: the line-search scale of each step after the first (0: J did not decrease along it, "
        "the point before it stands).",
    )


class EditCurvatureReport(Diagnostics):
    """How the edit's Gauss-Newton products were computed (`newton` and `proximal`; the last operator built)."""

    products: Literal["stored", "matrix_free"] | None = None
    reason: str | None = Field(None, description="`matrix_free`: why the square root of G was not stored.")
    stored_terms: int | None = Field(None, description="`stored`: rows J_iᵀ c_ik of the square root of G kept.")
    candidate_terms: int | None = Field(None, description="`stored`: remaining rows × outputs per row.")
    left_out_share: float | None = Field(
        None, description="`stored`: the weight of the terms left out (≤ curvature_tol of the total)."
    )
    preconditioner: str | None = Field(
        None, description="The solves' preconditioner (`kronecker`, `none`, or why none could be fitted)."
    )


class EditCurvatureScale(Diagnostics):
    """The mean Gauss-Newton eigenvalue at the model's weights over every training row that the default λ is a
    multiple of. It does not depend on the removed rows: later edits of the same attribution reuse it."""

    mean_eigenvalue: float = Field(gt=0, allow_inf_nan=False, description="trace(G)/D over the tracked parameters.")
    rule: str = Field(description="How it was computed (exact trace, dominant output terms, or sampled labels).")


class EditDiagnostics(Diagnostics):
    """What an edit did: its estimator, how far it moved the weights, and what that did to the losses."""

    estimator: str | None = None
    unit: str | None = Field(None, description="Meta methods: whether tasks or instances were removed.")
    num_removed: int | None = None
    num_train: int | None = None
    proximity: float | None = Field(None, description="λ of the proximal term ‖θ − θ₀‖².")
    proximity_rule: str | None = None
    reduction: str | None = Field(
        None,
        description="The retrain's loss over the remaining rows that the edit estimated: `mean` (over the rows "
        "kept) or `sum` (each row's weight unchanged). Null: `first_order` (the method's own step), meta methods "
        "and older edits.",
    )
    implied_weight_decay: float | None = Field(
        None,
        description="δ̂ = −⟨g₀, θ₀⟩ / ‖θ₀‖²: the L2 penalty that the training data's loss gradient g₀ at the "
        "model's weights θ₀ shows (a model trained to convergence with the penalty (δ/2)‖θ‖² has g₀ = −δ θ₀). "
        "The default λ is δ̂ where `implied_weight_decay_cosine` is at least 0.65.",
    )
    implied_weight_decay_cosine: float | None = Field(
        None, description="cos(g₀, −θ₀): how much of g₀ such a penalty explains (1: all of it; near 0: none)."
    )
    curvature_scale: EditCurvatureScale | None = Field(
        None, description="Set where λ is the default multiple of it (computed by this edit or an earlier one)."
    )
    step_norm: float | None = None
    relative_step_norm: float | None = Field(None, description="‖θ − θ₀‖ / ‖θ₀‖ (tracked weights).")
    remaining_loss_before: float | None = None
    remaining_loss_after: float | None = None
    remaining_loss_constant: float | None = Field(
        None,
        description="The remaining rows' mean loss under the best constant prediction (the class frequencies, the "
        "mean target, or the token frequencies): what the model had learned about them is this minus "
        "`remaining_loss_before`. Null when undefined (meta methods; negative example weights).",
    )
    learned_given_back: float | None = Field(
        None,
        description="(`remaining_loss_after` − `remaining_loss_before`) / (`remaining_loss_constant` − "
        "`remaining_loss_before`): the share of what the model had learned about the rows it keeps that the edit "
        "gave back. Above 0.01 the edit carries a warning (the default edits of the benchmark's models stay "
        "below 0.004). Null where the model was no better than the constant on those rows.",
    )
    passes_over_remaining_data: int | None = None
    solver: EditSolverReport | None = None
    curvature: EditCurvatureReport | None = None
    query_loss_before_mean: float | None = None
    query_loss_after_mean: float | None = None
    query_loss_changes: list[float] | None = Field(
        None, description="The change of each of the attribution's query losses (first 1,000 queries)."
    )
    warnings: list[str] = Field(
        default_factory=list, description="Set when the step leaves the region where the estimate can be trusted."
    )
