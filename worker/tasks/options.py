"""Stored request options (validated by the service) turned into the engine's option dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from worker import attribution

OptionsT = TypeVar("OptionsT")


def dataclass_from(cls: type[OptionsT], values: dict[str, Any]) -> OptionsT:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{key: value for key, value in values.items() if key in names})


def engine_options(method: str, values: dict[str, Any]) -> Any:
    if method == "influence":
        return dataclass_from(attribution.InfluenceOptions, values)
    if method == "datainf":
        return dataclass_from(attribution.DataInfOptions, values)
    if method == "gradient_similarity":
        return dataclass_from(attribution.GradientSimilarityOptions, values)
    if method.startswith("meta_"):
        from worker.attribution.meta import InnerOptions, MetaOptions

        inner = dataclass_from(InnerOptions, values.get("inner") or {})
        return dataclass_from(MetaOptions, {**values, "inner": inner})
    raise ValueError(f"no engine options for method {method!r}")


def fit_options(values: dict[str, Any]) -> attribution.FitOptions:
    return dataclass_from(attribution.FitOptions, values)
