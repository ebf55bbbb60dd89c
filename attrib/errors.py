"""Typed exceptions for the API's RFC 9457 problem documents, and for what happens around them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class FieldError:
    """One offending field of a 422: ``field`` is a dotted path such as ``body.options.damping``."""

    field: str
    message: str


class AttribError(Exception):
    """Base class of every exception the SDK raises."""


class ConfigurationError(AttribError):
    """The client cannot be set up (no API key found, for example)."""


class ConnectionFailed(AttribError):
    """The server could not be reached, even after retrying."""


class ApiError(AttribError):
    """The API answered with a problem document (``application/problem+json``).

    Attributes: ``status`` (HTTP status), ``title``, ``detail`` (what went wrong, in words), ``type`` (a URI
    naming the kind of problem), ``errors`` (a list of :class:`FieldError` for validation errors) and
    ``problem`` (the whole document).

    >>> try:
    ...     client.get_model("mdl_missing")
    ... except NotFound as error:
    ...     print(error.status, error.detail)
    404 model 'mdl_missing' does not exist
    """

    status: int = 0

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", ""))
        self.type = str(problem.get("type", "about:blank"))
        self.errors = [
            FieldError(str(e.get("field", "")), str(e.get("message", "")))
            for e in problem.get("errors") or []
            if isinstance(e, dict)
        ]
        super().__init__(f"{status} {self.title}: {self.detail}" if self.title else f"{status}: {self.detail}")


class BadRequest(ApiError):
    """400: a malformed request (for example a page token this API did not issue)."""


class Unauthorized(ApiError):
    """401: the API key is missing or not valid."""


class NotFound(ApiError):
    """404: no such resource for this tenant (another tenant's resource answers 404 too)."""


class Conflict(ApiError):
    """409: the resource is not in a state that allows this (results of an unfinished job, say)."""


class PayloadTooLarge(ApiError):
    """413: the upload is over the server's size limit."""


class UnsupportedMediaType(ApiError):
    """415: the body has the wrong content type."""


class InvalidInput(ApiError):
    """422: the request or upload is invalid; ``errors`` lists the offending fields."""


class ServiceUnavailable(ApiError):
    """503: the server or its job queue is unavailable (raised once retries are spent)."""


class ServerError(ApiError):
    """Any other 5xx."""


ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidInput,
    503: ServiceUnavailable,
}


class JobFailed(AttribError):
    """A job ended ``failed`` or ``cancelled``; ``job`` is its final state, ``error`` its problem document."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.error: dict[str, Any] | None = job.error
        detail = (job.error or {}).get("detail", "no detail")
        super().__init__(f"job {job.id} {job.status}: {detail}")


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed exception for an error response (a problem document, or whatever text came back)."""
    problem: dict[str, Any]
    try:
        body = response.json()
        problem = body if isinstance(body, dict) else {"detail": str(body)}
    except ValueError:
        problem = {"detail": response.text[:500] or response.reason_phrase}
    problem.setdefault("title", response.reason_phrase)
    status = response.status_code
    kind = ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return kind(status, problem)
