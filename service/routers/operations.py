"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text

from service.db.session import get_engine, session_scope
from service.db.tables import Job

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up. Answered by the event loop, outside admission control: it answers under any load."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A dependency is unreachable."}})
def readyz(request: Request) -> JSONResponse:
    """Database, broker and storage are reachable."""
    state = request.app.state
    checks = {
        "database": _database_ready(state.settings.resolved_database_url),
        "broker": state.queue.ready(),
        "storage": state.store.ready(),
    }
    ready = all(checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503)


def _database_ready(url: str) -> bool:
    try:
        with get_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001
        return False


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: request counts and latencies, jobs by status."""
    state = request.app.state
    with session_scope(state.settings.resolved_database_url) as session:
        counts = {status: count for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status))}
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        state.metrics.jobs.labels(status=status).set(counts.get(status, 0))
    return PlainTextResponse(generate_latest(state.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)
