from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import EXAMPLE_TIME, BatchSize, Damping, Timestamp
from service.schemas.options import FitLevelOptions, FitStrategy


class FitIn(FitLevelOptions):
    """A curvature fit of a model on a dataset, for attributions to reuse via `fit_id`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
                    "dataset_id": "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
                    "strategy": "ekfac",
                    "fisher": "true",
                    "fisher_samples": 1,
                    "seed": 0,
                    "batch_size": 256,
                }
            ]
        }
    )

    model_id: str
    dataset_id: str
    strategy: FitStrategy = "ekfac"
    checkpoint_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, max_length=10_000, description="Fit at each of these checkpoints (for SOURCE)."
    )
    damping: Damping | None = Field(None, description="Default damping stored with the fit.")
    batch_size: BatchSize = 256


class FitOut(BaseModel):
    """A curvature fit; usable once its job has succeeded."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "fit_0a1b2c3d4e5f6a7b8c9d0e1f",
                    "job_id": "job_7d6c5b4a3f2e1d0c9b8a7f6e",
                    "status": "queued",
                    "model_id": "mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
                    "dataset_id": "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
                    "strategy": "ekfac",
                    "damping": None,
                    "checkpoint_ids": None,
                    "options": {
                        "fisher": "true",
                        "fisher_samples": 1,
                        "seed": 0,
                        "layers": None,
                        "batch_size": 256,
                        "strategy": "ekfac",
                    },
                    "created_at": EXAMPLE_TIME,
                }
            ]
        }
    )

    id: str
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model_id: str
    dataset_id: str
    strategy: str
    damping: float | None
    checkpoint_ids: list[str] | None
    options: dict[str, Any]
    created_at: Timestamp
