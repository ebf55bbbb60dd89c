from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.schemas.options import FitLevelOptions, FitStrategy


class FitIn(FitLevelOptions):
    model_id: str
    dataset_id: str
    strategy: FitStrategy = "ekfac"
    checkpoint_ids: list[str] | None = Field(None, description="Fit at each of these checkpoints (for SOURCE).")
    damping: float | None = Field(None, gt=0, allow_inf_nan=False, description="Default damping stored with the fit.")
    batch_size: int = Field(256, ge=1, le=65_536)


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
