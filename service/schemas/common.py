"""Shapes shared by several resources."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


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
