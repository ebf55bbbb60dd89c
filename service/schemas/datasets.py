from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.schemas.common import StrictModel


class DatasetMetadata(StrictModel):
    """The `metadata` part of `POST /v1/datasets`."""

    name: str = Field(min_length=1, max_length=200)


class DatasetOut(BaseModel):
    id: str
    name: str
    format: str
    num_examples: int
    fields: dict[str, dict[str, Any]]
    created_at: datetime


class DatasetList(BaseModel):
    datasets: list[DatasetOut]
    next_page_token: str | None
