from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from service.schemas.common import StrictModel

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
    created_at: datetime


class ResultRow(BaseModel):
    query_id: int | str | None
    direction: Literal["positive", "negative"]
    rank: int
    train_id: int | str
    score: float
    task: int | None = Field(None, description="Meta instance rows: the instance's task.")
    split: int | None = Field(None, description="Meta instance rows: 0 = task train, 1 = task validation.")


class ResultsPage(BaseModel):
    results: list[ResultRow]
    next_page_token: str | None


class EditIn(StrictModel):
    remove: list[StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=256)]] = Field(
        min_length=1, max_length=100_000, description="Training ids (or task ids).")
    name: str = Field(min_length=1, max_length=200)
