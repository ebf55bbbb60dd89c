"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from sqlalchemy import func, select, text

from service.db.session import get_engine, session_scope
from service.db.tables import Job
from service.metrics import Metrics
from service.problems import PROBLEM_MEDIA_TYPE, ProblemError, problem_responses
from service.queue import JobQueue

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz", summary="Liveness", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}}
)
async def healthz() -> dict[str, str]:
    """The process is up. Answered by the event loop, outside admission control: it answers under any load."""
    return {"status": "ok"}


READY_EXAMPLE = {"status": "ok", "checks": {"database": True, "broker": True, "storage": True}}


@router.get(
    "/readyz",
    summary="Readiness",
    responses={
        200: {
            "description": "Every dependency is reachable.",
            "content": {"application/json": {"example": READY_EXAMPLE}},
        },
        503: {
            "description": "A dependency is unreachable (or, as for any route, the server is at capacity: a problem).",
            "content": {
                "application/json": {
                    "example": {"status": "unavailable", "checks": {"database": True, "broker": False, "storage": True}}
                },
                PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}},
            },
        },
    },
)
def readyz(request: Request) -> JSONResponse:
    """Database, broker and storage are reachable."""
    state = request.app.state
    checks = {
        "database": _database_ready(state.settings.resolved_database_url),
        "broker": state.queue.ready(),
        "storage": state.store.ready(),
    }
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


def _check_operator(request: Request, token: SecretStr | None) -> None:
    if token is None:
        raise ProblemError(
            404, "metrics are off: the operator sets ATTRIB_METRICS_TOKEN to serve them", kind="not-found"
        )
    presented = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise ProblemError(
            401,
            "GET /metrics needs the operator's metrics token",
            kind="unauthenticated",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _database_ready(url: str) -> bool:
    try:
        with get_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001
        return False


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    responses={
        **problem_responses(401, 404),
        200: {"content": {"text/plain": {"example": '# TYPE attrib_jobs gauge\nattrib_jobs{status="queued"} 0.0\n'}}},
    },
)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: request counts and latencies, jobs by status (all tenants together), messages
    waiting in each broker queue (`attrib_queue_messages{queue="gpu"}`) and whether the broker answered. For operators:
    it needs `Authorization: Bearer <ATTRIB_METRICS_TOKEN>`, and answers 404 when that setting is unset."""
    state = request.app.state
    _check_operator(request, state.settings.metrics_token)
    with session_scope(state.settings.resolved_database_url) as session:
        counts = {
            status: count for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status))
        }
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        state.metrics.jobs.labels(status=status).set(counts.get(status, 0))
    _record_queue_depths(state.queue, state.metrics)
    return PlainTextResponse(generate_latest(state.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)


def _record_queue_depths(queue: JobQueue, metrics: Metrics) -> None:
    """Queue depth per queue, read from the broker at each scrape; while it is down, no depth is reported."""
    metrics.queue_messages.clear()
    try:
        depths = queue.backlogs()
    except Exception:  # noqa: BLE001  (any broker failure: reported as attrib_broker_up 0)
        metrics.broker_up.set(0)
        return
    metrics.broker_up.set(1)
    for name, depth in depths.items():
        metrics.queue_messages.labels(queue=name).set(depth)
