from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    RootModel,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError, core_schema

from service.schemas.common import EXAMPLE_TIME, StrictModel, Timestamp
from service.schemas.diagnostics import AttributionDiagnostics
from worker.methods.base import Method
from worker.methods.registry import DEFAULT_METHOD, UnknownMethod, all_methods, get_method, method_names

ResourceId = Annotated[str, Field(min_length=1, max_length=64)]


class AttributionRequest(StrictModel):
    """What every method's request has. Give exactly one of `model_id` and `model_ids`."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["model_id"]}, {"required": ["model_ids"]}]})

    model_id: ResourceId | None = None
    model_ids: list[ResourceId] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="An ensemble of independently trained models of one architecture; scores are averaged.",
    )
    train_dataset_id: ResourceId
    query_dataset_id: ResourceId | None = Field(None, description="Required except in `self` mode.")
    method: str = DEFAULT_METHOD
    fit_id: ResourceId | None = None
    measurement: Literal["loss", "margin"] = "loss"
    mode: Literal["pairwise", "aggregate", "self"] = "pairwise"
    top_k: StrictInt = Field(
        10, ge=1, le=1_000_000, description="Rows per query and direction (a server setting may cap it lower: 422)."
    )
    per_token: StrictBool = Field(
        False,
        description="Causal language models, `pairwise` mode: attribute each scored query token separately. Each "
        "token gets its own top-k rows, which add `query_token` (its position in the query) and `query_token_text`. "
        "Otherwise a 422.",
    )
    options: StrictModel

    @model_validator(mode="after")
    def _one_model_source(self) -> AttributionRequest:
        if (self.model_id is None) == (self.model_ids is None):
            raise ValueError("give exactly one of model_id and model_ids")
        return self

    @property
    def all_model_ids(self) -> list[str]:
        return [self.model_id] if self.model_id is not None else list(self.model_ids or [])


_variants: dict[str, type[AttributionRequest]] = {}


def request_model(method: Method) -> type[AttributionRequest]:
    """The request body of one method: `method` is its name, `options` its own strict options model."""
    known = _variants.get(method.name)
    if known is not None and known.model_fields["options"].annotation is method.options:
        return known
    name_type: Any = cast(Any, Literal)[method.name]  # the one name, as a JSON schema `const`
    method_field = (name_type, Field(method.name if method.name == DEFAULT_METHOD else ..., description=method.summary))
    modes: Any = cast(Any, Literal)[method.modes]
    measurements: Any = cast(Any, Literal)[method.measurements]
    variant = create_model(
        f"{method.options.__name__.removesuffix('Options')}AttributionIn",
        __base__=AttributionRequest,
        __module__=__name__,
        method=method_field,
        mode=(
            modes,
            Field(
                method.modes[0],
                description="`pairwise`: top-k rows per query; `aggregate`: one ranking "
                "for the summed queries; `self`: each training example's score on itself.",
            ),
        ),
        measurement=(
            measurements,
            Field(
                method.measurements[0],
                description="What is measured on a query: its loss, or its margin (classifiers).",
            ),
        ),
        options=(
            method.options,
            Field(
                default_factory=method.options,
                description=f"Options of method `{method.name}`; unknown options are a 422; omitted: every default.",
            ),
        ),
    )
    _variants[method.name] = variant
    return variant


def _validate_by_method(value: Any) -> AttributionRequest:
    """The body validated by the model of the method it names (default `influence`), with the current registry."""
    if isinstance(value, AttributionRequest):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("model_type", "Input should be a valid dictionary or object")
    name = value.get("method", DEFAULT_METHOD)
    try:
        method = get_method(name) if isinstance(name, str) else None
    except UnknownMethod:
        method = None
    if method is None:
        expected = ", ".join(repr(n) for n in method_names())
        raise ValidationError.from_exception_data(
            "AttributionIn",
            [
                InitErrorDetails(
                    type=PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected}),
                    loc=("method",),
                    input=name,
                )
            ],
        )
    return request_model(method).model_validate(value)


def request_union() -> Any:
    """Every registered method's request model, as one union discriminated on `method`."""
    variants = [request_model(entry) for entry in all_methods()]
    return Annotated[functools.reduce(operator.or_, variants), Field(discriminator="method")]


class _ByMethod:
    """`AttributionIn`: validated by the model of the method the body names (default `influence`) in the registry
    as it is when the request comes; documented as the oneOf of every method's request model, discriminated on
    `method` (component `AttributionIn`)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate_by_method,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.model_dump(mode="json")),
        )

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(TypeAdapter(request_union()).core_schema)


class AttributionIn(RootModel[Annotated[AttributionRequest, _ByMethod()]]):
    """The body of `POST /v1/attributions`: one method's request, chosen by `method` (default `influence`); each
    method has its own strict options model (docs/methods.md). Give exactly one of `model_id` and `model_ids`."""


class AttributionOut(BaseModel):
    """An attribution; its ranked rows are at `results_url` once its job has succeeded."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "attr_9c8b7a6f5e4d3c2b1a0f9e8d",
                    "job_id": "job_7d6c5b4a3f2e1d0c9b8a7f6e",
                    "status": "queued",
                    "model_ids": ["mdl_3f9c0e6a1b2c4d5e6f7a8b9c"],
                    "train_dataset_id": "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
                    "query_dataset_id": "ds_8a9b0c1d2e3f4a5b6c7d8e9f",
                    "method": "influence",
                    "fit_id": None,
                    "measurement": "loss",
                    "mode": "pairwise",
                    "top_k": 10,
                    "per_token": False,
                    "options": {"strategy": "ekfac"},
                    "diagnostics": None,
                    "num_results": 0,
                    "results_url": "/v1/attributions/attr_9c8b7a6f5e4d3c2b1a0f9e8d/results",
                    "created_at": EXAMPLE_TIME,
                }
            ]
        }
    )

    id: str
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model_ids: list[str]
    train_dataset_id: str
    query_dataset_id: str | None
    method: str
    fit_id: str | None
    measurement: str
    mode: str
    top_k: int
    per_token: bool = Field(False, description="Each scored query token was attributed separately.")
    options: dict[str, Any]
    diagnostics: AttributionDiagnostics | None = Field(
        None,
        description="How the job computed its scores (one schema per method, chosen by `method`): damping used, "
        "tracked layers, solver iterations, warnings. Set once the job has succeeded.",
    )
    num_results: int
    results_url: str
    created_at: Timestamp


@dataclass(frozen=True)
class ResultIdTypes:
    """Whether a result's query and train ids are given back as text (else as integers): stored ids are text."""

    query_ids_are_strings: bool
    train_ids_are_strings: bool


class ResultRow(BaseModel):
    """One ranked training example for one query (docs/contract.md: results and the sign convention). Read from a
    stored row with `from_attributes` and a `ResultIdTypes` as the context."""

    query_id: int | str | None = Field(
        description="The query's id as in its dataset; null in `aggregate` and `self` modes."
    )
    direction: Literal["positive", "negative"] = Field(description="`positive`: helps the query; `negative`: hurts.")
    rank: int = Field(description="1 = strongest, within (query, direction).")
    train_id: int | str = Field(
        description="The training example's id as in its dataset (meta task influence: the task)."
    )
    score: float = Field(
        description="Positive: removing the example would raise the query's loss (lower its "
        "margin). `self` mode: higher = more unusual."
    )
    task: int | None = Field(None, description="Meta instance rows: the instance's task.")
    split: int | None = Field(None, description="Meta instance rows: 0 = task train, 1 = task validation.")
    query_token: int | None = Field(
        None,
        description="`per_token` attributions: the position of the attributed token in its query (0 = the first "
        "token; only scored tokens have rows). Null otherwise.",
    )
    query_token_text: str | None = Field(
        None,
        description="`per_token` attributions: that token decoded with the model's uploaded tokenizer; null "
        "without a tokenizer, and otherwise.",
    )

    @field_validator("query_id", "train_id", mode="before")
    @classmethod
    def _caller_id_type(cls, value: object, info: ValidationInfo) -> object:
        types = info.context
        if not isinstance(types, ResultIdTypes):
            return value
        as_string = types.query_ids_are_strings if info.field_name == "query_id" else types.train_ids_are_strings
        return caller_id(value, as_string)


def caller_id(value: object, as_string: bool) -> object:
    """A stored id (text) as the caller's dataset has it: text, or an integer."""
    return int(value) if isinstance(value, str) and not as_string else value


class ResultsPage(BaseModel):
    """A page of ranked rows, by query, then rank; `next_page_token` is null on the last page."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {
                            "query_id": 7,
                            "direction": "positive",
                            "rank": 1,
                            "train_id": 412,
                            "score": 3.25,
                            "task": None,
                            "split": None,
                            "query_token": None,
                            "query_token_text": None,
                        },
                        {
                            "query_id": 7,
                            "direction": "positive",
                            "rank": 2,
                            "train_id": 58,
                            "score": 1.5,
                            "task": None,
                            "split": None,
                            "query_token": None,
                            "query_token_text": None,
                        },
                    ],
                    "next_page_token": "WzAsIDJd",
                }
            ]
        }
    )

    results: list[ResultRow]
    next_page_token: str | None


class EditOptionsIn(StrictModel):
    """How the edit estimates the retrained model (docs/editing.md says what each estimator assumes)."""

    estimator: Literal["newton", "proximal", "first_order"] | None = Field(
        None,
        description="`newton` (default; meta instance influence: `first_order`): a Gauss-Newton step of the "
        "proximal retrain objective from the current weights, inside a trust radius, with a line search on the real "
        "remaining-data loss, and a further one from the point reached where that line search stopped short "
        "(`newton_steps`). `proximal`: Gauss-Newton (Levenberg-Marquardt) steps until that objective is minimised "
        "to `tol` (slower). `first_order`: θ + (1/N) P Σ ∇ℓ with the attribution's own preconditioner and scoring "
        "damping (SOURCE: its unrolled estimate; meta: (H + ρI)⁻¹ Σ g). Meta task influence: `newton` solves with "
        "H − Σ H_k, `proximal` iterates the retrain; meta instance influence supports `first_order` and `proximal`.",
    )
    proximity: float | None = Field(
        None,
        gt=0,
        le=1e12,
        allow_inf_nan=False,
        description="λ of the proximal term (λ/2)‖θ − θ₀‖² of the retrain objective; a model trained with an L2 "
        "penalty (δ/2)‖θ‖² is best edited with λ = δ (the objective is then its penalised retrain objective). Null: "
        "the L2 penalty the model's gradient shows, where it shows one (the diagnostics' `implied_weight_decay`, "
        "when `implied_weight_decay_cosine` ≥ 0.65), else 0.5 × the mean Gauss-Newton eigenvalue trace(G)/D of the "
        "tracked layers, computed from the rows of a square root of G (sampled for token datasets; the diagnostics' "
        "`proximity_rule` says which) (meta: the attribution's damping ρ).",
    )
    max_steps: int = Field(5, ge=1, le=100, description="`proximal`: at most this many Gauss-Newton steps.")
    tol: float = Field(1e-3, gt=0, lt=1, description="`proximal`: stop when ‖∇J‖ ≤ tol × its value at θ₀.")
    cg_max_iter: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Conjugate-gradient iterations (curvature products) per Gauss-Newton step. Null: 8 with the "
        "Kronecker preconditioner, 20 without.",
    )
    trust_radius: float = Field(
        1.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="Step norm, relative to the tracked weights' norm, beyond which the estimate is not trusted: "
        "an edit that moves further carries a warning (`first_order`); a longer `newton` step is shortened to it "
        "before its line search (the solver's `clipped_to_trust_radius`).",
    )
    batch_size: int = Field(2048, ge=1, le=65536, description="Rows per forward pass over the training data.")
    curvature_products: Literal["auto", "stored", "matrix_free"] = Field(
        "auto",
        description="How the Gauss-Newton products of `newton` and `proximal` are computed. `matrix_free`: two "
        "backward passes over the remaining rows per product. `stored`: the rows J_iᵀ c_ik of a square root of G "
        "(one per row and model output, H_i = Σ_k c_ik c_ikᵀ) are computed once and kept in memory, leaving out "
        "the smallest terms worth `curvature_tol` of the total; a product is then two matrix-vector products. "
        "`auto` (default): stored when the model has at most 1,024 outputs per row (not token datasets), the "
        "rows fit in 512 MiB and they save at least half the products' work (models with convolutions; not "
        "models of linear layers only), matrix-free otherwise.",
    )
    curvature_tol: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="`stored` products: the share of the output-curvature weight (Σ_i w_i trace H_i) whose terms "
        "may be left out, smallest first (0: none).",
    )
    line_search: Literal["boundary", "halving"] = Field(
        "boundary",
        description="How far `newton` (and the first step of `proximal`) goes along its Gauss-Newton step d. A "
        "scale s is acceptable when the proximal objective J at θ₀ + s d has decreased by at least 1e-4 of its "
        "predicted first-order decrease. `boundary` (default): find the edge b of the acceptable scales (to within "
        "1/32) and step min(1, `boundary_share` × b). `halving`: the first acceptable scale of 1, ½, ¼, … (its "
        "answer jumps by factors of two as the removal changes). Meta methods: ignored.",
    )
    boundary_share: float = Field(
        0.85,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="`boundary` line search: the share of the way to the edge that the step goes.",
    )
    preconditioner: Literal["auto", "kronecker", "none"] = Field(
        "auto",
        description="The preconditioner of the conjugate-gradient solves of `newton` and `proximal`. `kronecker`: "
        "each tracked layer's block of G approximated by a Kronecker product in the eigenbases of the Gram factors "
        "of its square-root rows (fitted from the rows that `stored` products keep, or, matrix-free, from one more "
        "pass over the remaining rows' terms holding 95% of the output-curvature weight; not for token datasets). "
        "`none`: plain CG. `auto` (default): `kronecker` where the products are `stored`, `none` where they are "
        "matrix-free (there plain CG truncated at 20 iterations is part of the measured estimate).",
    )
    newton_steps: int | None = Field(
        None,
        ge=1,
        le=20,
        description="`newton`: at most this many Gauss-Newton steps, each line-searched on the proximal objective J; "
        "a further step is taken while the last line search stopped short of its full step (J left its quadratic "
        "model along the straight line), from the point reached, with the remaining rows linearised afresh there. "
        "Null (auto): 2 where the rows of G are stored (`curvature_products`; a further step then costs one pass "
        "and a cheap solve), 1 where the products are matrix-free (it would cost as much as the first step). "
        "Ignored by the other estimators.",
    )
    reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="The loss the retrain minimises over the remaining rows. `mean` (default): their mean, as a "
        "model trained on the mean loss over its rows (PyTorch's default reduction) is retrained: each remaining "
        "row then weighs N / (N − removed) times more against the model's penalty and the proximal term. `sum`: "
        "each row keeps its weight (a loss summed over the rows, or divided by the full count). `newton` and "
        "`proximal`; ignored by `first_order` and the meta methods.",
    )


class EditIn(StrictModel):
    remove: list[StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=256)]] = Field(
        min_length=1, max_length=100_000, description="Training ids (or task ids)."
    )
    name: str = Field(min_length=1, max_length=200)
    options: EditOptionsIn = Field(default_factory=EditOptionsIn)

    model_config = ConfigDict(
        **StrictModel.model_config,
        json_schema_extra={
            "examples": [{"remove": [12, 408, 977], "name": "digits-mlp-minus-3", "options": {"estimator": "newton"}}]
        },
    )


class EditAccepted(BaseModel):
    """`POST /v1/attributions/{id}/edit`: the queued edit. The model exists once the job succeeds."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model_id": "mdl_6b5a4f3e2d1c0b9a8f7e6d5c", "job_id": "job_1a2b3c4d5e6f7a8b9c0d1e2f"}]
        }
    )

    model_id: str
    job_id: str
