"""Shapes shared by several resources."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Request bodies: unknown fields are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")
