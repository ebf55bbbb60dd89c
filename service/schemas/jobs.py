from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import EXAMPLE_TIME, Timestamp


class JobProgress(BaseModel):
    stage: str = Field(description="What the job is doing, e.g. `queued`, `fit`, `scores`, `done`.")
    completed: int
    total: int


JOB_EXAMPLE: dict[str, Any] = {
    "id": "job_7d6c5b4a3f2e1d0c9b8a7f6e",
    "kind": "attribution",
    "status": "succeeded",
    "progress": {"stage": "done", "completed": 1, "total": 1},
    "error": None,
    "result_url": "/v1/attributions/attr_9c8b7a6f5e4d3c2b1a0f9e8d/results",
    "fit_id": None,
    "attribution_id": "attr_9c8b7a6f5e4d3c2b1a0f9e8d",
    "model_id": None,
    "created_at": EXAMPLE_TIME,
    "started_at": "2026-01-31T09:30:01.000000Z",
    "finished_at": "2026-01-31T09:30:07.500000Z",
}


class JobOut(BaseModel):
    """A fit, attribution or edit job: `queued` → `running` → `succeeded` | `failed` | `cancelled`."""

    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    kind: Literal["fit", "attribution", "edit"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    error: dict[str, Any] | None = Field(description="A failed job's problem document (RFC 9457).")
    result_url: str | None = Field(
        description="Once succeeded: the attribution's results, the fit or the edited model."
    )
    fit_id: str | None = None
    attribution_id: str | None = None
    model_id: str | None = Field(
        None, description="Edit jobs: the model the edit makes (it exists once the job succeeds)."
    )
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


class JobList(BaseModel):
    """A page of jobs, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"jobs": [JOB_EXAMPLE], "next_page_token": None}]})

    jobs: list[JobOut]
    next_page_token: str | None
