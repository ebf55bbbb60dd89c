"""The OpenAPI document, made usable by client generators.

FastAPI builds the document from the routes and the pydantic schemas; this module fixes, in one explicit pass, what
that leaves ambiguous for a generated client:

- file parts of multipart uploads are `type: string, format: binary` (OpenAPI 3.1's `contentMediaType` alone makes
  generators send the file as a text field);
- every JSON request body and JSON response carries an `example`: the first of its schema's `examples`, or, for a
  problem document, a problem of that status as the service sends it;
- every parameter carries an example (ids, page sizes, tokens, ...).

Operation ids are the route functions' names (`upload_model`, `get_results`, ...), so generated functions read well.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.problems import PROBLEM_TYPE_BASE, FieldError, Problem

PARAMETER_EXAMPLES: dict[tuple[str, str], Any] = {
    ("path", "model_id"): "mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
    ("path", "dataset_id"): "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
    ("path", "fit_id"): "fit_0a1b2c3d4e5f6a7b8c9d0e1f",
    ("path", "attribution_id"): "attr_9c8b7a6f5e4d3c2b1a0f9e8d",
    ("path", "job_id"): "job_7d6c5b4a3f2e1d0c9b8a7f6e",
    ("query", "page_size"): 50,
    ("query", "page_token"): "WzAsIDJd",  # opaque: always the `next_page_token` of the page before
    ("query", "direction"): "negative",
    ("query", "query_id"): "7",
    ("query", "query_token"): 3,
    ("query", "model_id"): "mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
    ("query", "format"): "ndjson",
    ("query", "ids"): ["12", "408"],
    ("query", "status"): "running",
    ("header", "idempotency-key"): "upload-digits-train-2026-01-31",
}
JSON_MEDIA_TYPES = ("application/json", "application/problem+json")
NOT_READY = "attribution 'attr_9c8b7a6f5e4d3c2b1a0f9e8d' has no results: its job is running"
# (kind, title, detail) of a typical problem of each status, as `service.problems` and the middleware word them.
PROBLEM_EXAMPLES = {
    400: ("invalid-page-token", "Invalid page token", "page_token is not a token this API issued"),
    401: ("unauthenticated", "Unauthorized", "an API key is required: send `Authorization: Bearer <key>`"),
    404: ("not-found", "Not Found", "model 'mdl_3f9c0e6a1b2c4d5e6f7a8b9c' does not exist"),
    409: (
        "idempotency-key-in-use",
        "Conflict",
        "a request with this Idempotency-Key is still in progress; retry later",
    ),
    413: (
        "payload-too-large",
        "Content Too Large",
        "the request body (3221225472 bytes) is larger than the limit of 2147483648 bytes for this content type",
    ),
    415: ("unsupported-media-type", "Unsupported Media Type", "send the body as application/json, not text/plain"),
    422: ("invalid-input", "Invalid input", "the request is invalid: body.top_k: Input should be a valid integer"),
    429: (
        "rate-limited",
        "Too Many Requests",
        "too many requests for this API key (at most 20/s, bursts of 40); retry after the time in Retry-After",
    ),
    503: ("overloaded", "Service Unavailable", "the service is at capacity; retry after the time in Retry-After"),
}
CONFLICT_EXAMPLES = {  # 409s other than a busy Idempotency-Key
    "/v1/attributions/{attribution_id}/results": ("results-not-ready", "Conflict", NOT_READY),
    "/v1/attributions/{attribution_id}/results/export": ("results-not-ready", "Conflict", NOT_READY),
    "/v1/attributions/{attribution_id}/edit": ("results-not-ready", "Conflict", NOT_READY),
    "/v1/jobs/{job_id}/cancel": (
        "conflict",
        "Conflict",
        "job 'job_7d6c5b4a3f2e1d0c9b8a7f6e' has already finished (succeeded)",
    ),
    "/v1/models/{model_id}/checkpoints": (
        "conflict",
        "Conflict",
        "the model already has checkpoint 'ckpt_2b3c4d5e6f7a8b9c0d1e2f3a' at step 500 of stage 0",
    ),
}


def operation_id(route: APIRoute) -> str:
    """The route function's name: `upload_model`, not `upload_model_v1_models_post`."""
    return route.name


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and so `/openapi.json`) return FastAPI's document refined by `refine`."""

    def openapi() -> dict[str, Any]:
        return refine(FastAPI.openapi(app))  # FastAPI caches the document; refining it again changes nothing

    app.openapi = openapi  # type: ignore[method-assign]


def refine(spec: dict[str, Any]) -> dict[str, Any]:
    """The changes listed in this module's docstring, made in place (idempotent)."""
    schemas: dict[str, Any] = spec.get("components", {}).get("schemas", {})
    for path, operation in _operations(spec):
        _binary_file_parts(operation, schemas)
        _body_and_response_examples(operation, schemas, path)
        _parameter_examples(operation)
    return spec


def _operations(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, operation) for path, item in spec.get("paths", {}).items() for operation in item.values()]


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return schemas.get(ref.rsplit("/", 1)[-1], schema) if ref.startswith("#/components/schemas/") else schema


def _binary_file_parts(operation: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Multipart parts that FastAPI describes as `contentMediaType` strings (its `UploadFile`) become binary."""
    media = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if media is None:
        return
    body = _resolve(media["schema"], schemas)
    for part in body.get("properties", {}).values():
        _mark_binary(part)


def _mark_binary(part: dict[str, Any]) -> None:
    """A file part, also inside an optional part (`anyOf` with null) or a repeated one (array `items`)."""
    if part.get("type") == "string" and "contentMediaType" in part:
        part["format"] = "binary"
    for variant in part.get("anyOf", []):
        _mark_binary(variant)
    if isinstance(part.get("items"), dict):
        _mark_binary(part["items"])


def problem_example(status: int, path: str) -> dict[str, Any]:
    kind, title, detail = PROBLEM_EXAMPLES[status]
    if status == 409:
        kind, title, detail = CONFLICT_EXAMPLES.get(path, (kind, title, detail))
    errors = [FieldError(field="body.top_k", message="Input should be a valid integer")] if status == 422 else None
    return Problem(
        type=PROBLEM_TYPE_BASE + kind, title=title, status=status, detail=detail, instance=path, errors=errors
    ).model_dump(exclude_none=True)


def _body_and_response_examples(operation: dict[str, Any], schemas: dict[str, Any], path: str) -> None:
    contents = [(None, operation.get("requestBody", {}).get("content", {}))]
    contents += [(status, response.get("content", {})) for status, response in operation.get("responses", {}).items()]
    for status, content in contents:
        for media_type, media in content.items():
            if media_type not in JSON_MEDIA_TYPES or "example" in media or "examples" in media:
                continue
            schema = media.get("schema", {})
            if schema.get("$ref", "").endswith("/Problem") and status is not None and int(status) in PROBLEM_EXAMPLES:
                media["example"] = problem_example(int(status), path)
                continue
            examples = _resolve(schema, schemas).get("examples")
            if examples:
                media["example"] = examples[0]


def _parameter_examples(operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        example = PARAMETER_EXAMPLES.get((parameter["in"], parameter["name"].lower()))
        if example is not None:
            parameter.setdefault("example", example)


def location_header(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry declaring the `Location` header that a 201 or 202 answer always carries."""
    return {
        status: {"headers": {"Location": {"description": description, "required": True, "schema": {"type": "string"}}}}
    }


def multipart_example(**parts: str) -> dict[str, Any]:
    """`openapi_extra=` giving an upload route's multipart body an example (file parts shown as placeholders)."""
    return {"requestBody": {"content": {"multipart/form-data": {"example": parts}}}}


def json_body_example(example: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra=` giving a JSON route's request body an example."""
    return {"requestBody": {"content": {"application/json": {"example": example}}}}
