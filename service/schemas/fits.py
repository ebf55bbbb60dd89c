from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from service.schemas.common import BatchSize, Damping
from service.schemas.options import FitLevelOptions, FitStrategy


class FitIn(FitLevelOptions):
    model_id: str
    dataset_id: str
    strategy: FitStrategy = "ekfac"
    checkpoint_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, max_length=10_000, description="Fit at each of these checkpoints (for SOURCE).")
    damping: Damping | None = Field(None, description="Default damping stored with the fit.")
    batch_size: BatchSize = 256


class FitOut(BaseModel):
    id: str
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model_id: str
    dataset_id: str
    strategy: str
    damping: float | None
    checkpoint_ids: list[str] | None
    options: dict[str, Any]
    created_at: datetime
