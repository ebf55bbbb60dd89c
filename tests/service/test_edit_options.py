"""The edit options of `POST /v1/attributions/{id}/edit` are typed from the SDK to the engine: the SDK's `Edit`
names the request's fields, every field of the request's `options` reaches `EditOptions` with its value, and the
request's defaults are the engine's."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from attrib.options import Edit
from service.schemas.attributions import EditOptionsIn
from worker.attribution import EditOptions
from worker.methods.engine_options import edit_options

# a value other than the default for every request option
CHANGED: dict[str, Any] = {
    "estimator": "proximal",
    "proximity": 0.5,
    "max_steps": 7,
    "tol": 0.01,
    "cg_max_iter": 11,
    "trust_radius": 2.0,
    "batch_size": 64,
    "curvature_products": "stored",
    "curvature_tol": 0.001,
    "line_search": "halving",
    "boundary_share": 0.5,
    "preconditioner": "none",
    "newton_steps": 3,
    "reduction": "sum",
}


def test_the_request_defaults_are_the_engines() -> None:
    assert edit_options(EditOptionsIn(), "newton") == EditOptions()


def test_every_request_option_reaches_the_engine() -> None:
    assert set(CHANGED) == set(EditOptionsIn.model_fields)
    assert set(CHANGED) <= {field.name for field in fields(EditOptions)}
    defaults = EditOptionsIn()
    assert all(getattr(defaults, name) != value for name, value in CHANGED.items())
    engine = edit_options(EditOptionsIn(**CHANGED), "newton")
    assert {name: getattr(engine, name) for name in CHANGED} == CHANGED
    engine.validate()


def test_the_sdks_edit_options_are_the_requests() -> None:
    assert {field.name for field in fields(Edit)} == set(EditOptionsIn.model_fields)
    assert EditOptionsIn(**Edit(**CHANGED).to_json()) == EditOptionsIn(**CHANGED)
