"""Shapes shared by several resources."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)


class StrictModel(BaseModel):
    """Request bodies: unknown fields are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


# Bounded, strictly typed option values: `false` is not 0, `1e30` is not an integer, and nothing is unbounded.
Seed = Annotated[StrictInt, Field(ge=0, le=2**31 - 1, description="A random seed in [0, 2³¹ − 1].")]
BatchSize = Annotated[StrictInt, Field(ge=1, le=65_536)]
Iterations = Annotated[StrictInt, Field(ge=1, le=100_000)]
Damping = Annotated[StrictFloat | StrictInt, Field(gt=0, le=1e8, allow_inf_nan=False)]
Tolerance = Annotated[StrictFloat | StrictInt, Field(gt=0, lt=1, allow_inf_nan=False)]
ModuleName = Annotated[StrictStr, Field(min_length=1, max_length=200)]
ModuleNames = Annotated[list[ModuleName], Field(min_length=1, max_length=4096)]
Flag = StrictBool


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def rfc3339_utc(moment: datetime) -> str:
    """`2026-01-31T09:30:00.250000Z`: RFC 3339, in UTC, with `Z` (never `+00:00`)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


EXAMPLE_TIME = "2026-01-31T09:30:00.250000Z"

# Every timestamp of every response: RFC 3339 in UTC with a `Z` suffix.
Timestamp = Annotated[
    datetime,
    AfterValidator(_utc),
    PlainSerializer(rfc3339_utc, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "examples": [EXAMPLE_TIME],
            "description": "RFC 3339, UTC, with a `Z` suffix.",
        }
    ),
]
