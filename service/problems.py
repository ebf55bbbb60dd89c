"""RFC 9457 problem details: every error the API returns is ``application/problem+json``."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("attrib")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://attrib.dev/problems/"


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `body.options.damping`.")
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "type": PROBLEM_TYPE_BASE + "not-found",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "model 'mdl_3f9c0e6a1b2c4d5e6f7a8b9c' does not exist",
                    "instance": "/v1/models/mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
                }
            ]
        }
    }

    type: str = Field(description="A URI naming the kind of problem.")
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = Field(None, description="Validation errors, one per offending field.")


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        title: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _slug(HTTPStatus(status).phrase)
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors
        self.headers = headers or {}


def not_found(what: str, ident: str) -> ProblemError:
    return ProblemError(404, f"{what} {ident!r} does not exist", kind="not-found")


def invalid(detail: str, field: str | None = None) -> ProblemError:
    errors = [FieldError(field=field, message=detail)] if field else None
    return ProblemError(422, detail, kind="invalid-input", title="Invalid input", errors=errors)


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str,
    title: str,
    instance: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=PROBLEM_TYPE_BASE + kind, title=title, status=status, detail=detail, instance=instance, errors=errors
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def problem_dict(status: int, detail: str, *, kind: str, title: str | None = None) -> dict[str, Any]:
    """A problem as a plain dict (stored as a failed job's ``error``)."""
    return Problem(
        type=PROBLEM_TYPE_BASE + kind, title=title or HTTPStatus(status).phrase, status=status, detail=detail
    ).model_dump(exclude_none=True)


def _slug(text: str) -> str:
    return text.lower().replace(" ", "-").replace("'", "")


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


async def _on_problem(request: Request, exc: ProblemError) -> JSONResponse:
    return problem_response(
        exc.status,
        exc.detail,
        kind=exc.kind,
        title=exc.title,
        instance=request.url.path,
        errors=exc.errors,
        headers=exc.headers,
    )


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [FieldError(field=_location(tuple(e.get("loc", ()))), message=str(e.get("msg"))) for e in exc.errors()]
    summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    return problem_response(
        422,
        f"the request is invalid: {summary}",
        kind="invalid-input",
        title="Invalid input",
        instance=request.url.path,
        errors=errors,
    )


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.url.path}"
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
    return problem_response(
        exc.status_code,
        detail,
        kind=_slug(HTTPStatus(exc.status_code).phrase),
        title=HTTPStatus(exc.status_code).phrase,
        instance=request.url.path,
        headers=headers or None,
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts on this path (Starlette's Allow names only the first route's)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, request.url.path):
            methods |= {verb.upper() for verb in operations}
    return sorted(methods)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500,
        "an unexpected error occurred; it has been logged",
        kind="internal-error",
        title="Internal Server Error",
        instance=request.url.path,
    )


HandledError = TypeVar("HandledError", bound=Exception)


def add_problem_handler(
    app: FastAPI,
    kind: type[HandledError],
    handler: Callable[[Request, HandledError], Awaitable[JSONResponse]],
) -> None:
    """``app.add_exception_handler`` for a handler of one exception class (Starlette types every handler as
    taking any ``Exception``; it calls this one only for ``kind`` and its subclasses)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, kind):
            raise exc
        return await handler(request, exc)

    app.add_exception_handler(kind, handle)


def install_problem_handlers(app: FastAPI) -> None:
    add_problem_handler(app, ProblemError, _on_problem)
    add_problem_handler(app, RequestValidationError, _on_validation)
    add_problem_handler(app, StarletteHTTPException, _on_http)
    add_problem_handler(app, Exception, _on_unexpected)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries declaring problem documents for the given statuses."""
    return {
        status: {
            "model": Problem,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }
