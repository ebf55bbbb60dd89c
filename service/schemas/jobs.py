from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class JobProgress(BaseModel):
    stage: str
    completed: int
    total: int


class JobOut(BaseModel):
    id: str
    kind: Literal["fit", "attribution", "edit"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    error: dict[str, Any] | None
    result_url: str | None
    fit_id: str | None = None
    attribution_id: str | None = None
    model_id: str | None = Field(None, description="Edit jobs: the model the edit makes (it exists once the job "
                                 "succeeds).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    jobs: list[JobOut]
    next_page_token: str | None
