from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from service.schemas.common import EXAMPLE_TIME, StrictModel, Timestamp

Method = Literal[
    "influence", "source", "datainf", "tracin", "gradient_similarity",
    "meta_task_influence", "meta_instance_influence",
]


ResourceId = Annotated[str, Field(min_length=1, max_length=64)]


class AttributionIn(StrictModel):
    """Give exactly one of `model_id` and `model_ids`."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["model_id"]}, {"required": ["model_ids"]}]})

    model_id: ResourceId | None = None
    model_ids: list[ResourceId] | None = Field(
        None, min_length=1, max_length=32,
        description="An ensemble of independently trained models of one architecture; scores are averaged.",
    )
    train_dataset_id: ResourceId
    query_dataset_id: ResourceId | None = Field(None, description="Required except in `self` mode.")
    method: Method = "influence"
    fit_id: ResourceId | None = None
    measurement: Literal["loss", "margin"] = "loss"
    mode: Literal["pairwise", "aggregate", "self"] = "pairwise"
    top_k: StrictInt = Field(10, ge=1, le=1_000_000, description="Rows per query and direction (a server setting "
                             "may cap it lower: 422).")
    options: dict[str, Any] = Field(default_factory=dict, description="Method-specific; unknown options are a 422.")

    @model_validator(mode="after")
    def _one_model_source(self) -> "AttributionIn":
        if (self.model_id is None) == (self.model_ids is None):
            raise ValueError("give exactly one of model_id and model_ids")
        return self

    @property
    def all_model_ids(self) -> list[str]:
        return [self.model_id] if self.model_id is not None else list(self.model_ids or [])


class AttributionOut(BaseModel):
    """An attribution; its ranked rows are at `results_url` once its job has succeeded."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "attr_9c8b7a6f5e4d3c2b1a0f9e8d", "job_id": "job_7d6c5b4a3f2e1d0c9b8a7f6e", "status": "queued",
        "model_ids": ["mdl_3f9c0e6a1b2c4d5e6f7a8b9c"], "train_dataset_id": "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
        "query_dataset_id": "ds_8a9b0c1d2e3f4a5b6c7d8e9f", "method": "influence", "fit_id": None,
        "measurement": "loss", "mode": "pairwise", "top_k": 10, "options": {"strategy": "ekfac"},
        "diagnostics": None, "num_results": 0, "results_url": "/v1/attributions/attr_9c8b7a6f5e4d3c2b1a0f9e8d/results",
        "created_at": EXAMPLE_TIME}]})

    id: str
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model_ids: list[str]
    train_dataset_id: str
    query_dataset_id: str | None
    method: str
    fit_id: str | None
    measurement: str
    mode: str
    top_k: int
    options: dict[str, Any]
    diagnostics: dict[str, Any] | None = Field(None, description="Damping used, solver iterations, warnings...")
    num_results: int
    results_url: str
    created_at: Timestamp


class ResultRow(BaseModel):
    """One ranked training example for one query (docs/contract.md: results and the sign convention)."""

    query_id: int | str | None = Field(description="The query's id as in its dataset; null in `aggregate` and "
                                       "`self` modes.")
    direction: Literal["positive", "negative"] = Field(description="`positive`: helps the query; `negative`: hurts.")
    rank: int = Field(description="1 = strongest, within (query, direction).")
    train_id: int | str = Field(description="The training example's id as in its dataset (meta task influence: "
                                "the task).")
    score: float = Field(description="Positive: removing the example would raise the query's loss (lower its "
                         "margin). `self` mode: higher = more unusual.")
    task: int | None = Field(None, description="Meta instance rows: the instance's task.")
    split: int | None = Field(None, description="Meta instance rows: 0 = task train, 1 = task validation.")


class ResultsPage(BaseModel):
    """A page of ranked rows, by query, then rank; `next_page_token` is null on the last page."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [
        {"query_id": 7, "direction": "positive", "rank": 1, "train_id": 412, "score": 3.25, "task": None,
         "split": None},
        {"query_id": 7, "direction": "positive", "rank": 2, "train_id": 58, "score": 1.5, "task": None,
         "split": None}],
        "next_page_token": "WzAsIDJd"}]})

    results: list[ResultRow]
    next_page_token: str | None


class EditOptionsIn(StrictModel):
    """How the edit estimates the retrained model (docs/editing.md says what each estimator assumes)."""

    estimator: Literal["newton", "proximal", "first_order"] | None = Field(
        None, description="`newton` (default; meta instance influence: `first_order`): one Gauss-Newton step of the "
        "proximal retrain objective from the current weights, inside a trust radius, with a line search on the real "
        "remaining-data loss. `proximal`: Gauss-Newton (Levenberg-Marquardt) steps until that objective is minimised "
        "to `tol` (slower). `first_order`: θ + (1/N) P Σ ∇ℓ with the attribution's own preconditioner and scoring "
        "damping (SOURCE: its unrolled estimate; meta: (H + ρI)⁻¹ Σ g). Meta task influence: `newton` solves with "
        "H − Σ H_k, `proximal` iterates the retrain; meta instance influence supports `first_order` and `proximal`.")
    proximity: float | None = Field(
        None, gt=0, le=1e12, allow_inf_nan=False,
        description="λ of the proximal term (λ/2)‖θ − θ₀‖² of the retrain objective. Null: the mean "
        "Gauss-Newton eigenvalue of the tracked layers (meta: the attribution's damping ρ).")
    max_steps: int = Field(5, ge=1, le=100, description="`proximal`: at most this many Gauss-Newton steps.")
    tol: float = Field(1e-3, gt=0, lt=1, description="`proximal`: stop when ‖∇J‖ ≤ tol × its value at θ₀.")
    cg_max_iter: int = Field(20, ge=1, le=1000, description="Conjugate-gradient iterations per Gauss-Newton step.")
    trust_radius: float = Field(
        0.2, gt=0, le=100, allow_inf_nan=False,
        description="Step norm, relative to the tracked weights' norm, beyond which the estimate is not trusted: "
        "a warning in the diagnostics (the `newton` step is shortened to it).")
    batch_size: int = Field(2048, ge=1, le=65536, description="Rows per forward pass over the training data.")


class EditIn(StrictModel):
    remove: list[StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=256)]] = Field(
        min_length=1, max_length=100_000, description="Training ids (or task ids).")
    name: str = Field(min_length=1, max_length=200)
    options: EditOptionsIn = Field(default_factory=EditOptionsIn)

    model_config = {**StrictModel.model_config, "json_schema_extra": {"examples": [
        {"remove": [12, 408, 977], "name": "digits-mlp-minus-3", "options": {"estimator": "newton"}}]}}


class EditAccepted(BaseModel):
    """`POST /v1/attributions/{id}/edit`: the queued edit. The model exists once the job succeeds."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model_id": "mdl_6b5a4f3e2d1c0b9a8f7e6d5c", "job_id": "job_1a2b3c4d5e6f7a8b9c0d1e2f"}]})

    model_id: str
    job_id: str
