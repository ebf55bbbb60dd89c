"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.admission import AdmissionControl
from service.db.session import configure_engine
from service.limits import BodySizeLimit
from service.metrics import MetricsMiddleware, create_metrics
from service.openapi import install_openapi, operation_id
from service.problems import add_problem_handler, install_problem_handlers, problem_response, problem_responses
from service.queue import CeleryQueue, JobQueue, KillBeforePublish
from service.quotas import RateLimiter
from service.reaper import start_reaper
from service.routers import attributions, datasets, fits, jobs, models, operations, pages
from service.routers.docs import install_docs
from service.settings import Settings, get_settings
from service.storage import BlobStore, LocalBlobStore
from worker.artifacts.errors import ArtifactError

DESCRIPTION = """
Training-data attribution: upload a model and its data, ask which training examples made the model
behave as it does on some queries, and page through the ranked answer.

Scores follow one sign convention: **positive = the training example helps the query** (removing it
would raise the query's loss), negative = it hurts. Scores are reported without the 1/N factor (as
kronfluence does). Every error is an RFC 9457 `application/problem+json` document.
"""


def create_app(
    settings: Settings | None = None,
    *,
    queue: JobQueue | None = None,
    store: BlobStore | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """The API. ``freeze_heap``: once started, keep what start-up allocated out of the garbage collector's view
    (`freeze_startup_heap`); `attrib serve` sets it, tests and embedding applications need not."""
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    configure_engine(settings.resolved_database_url, settings.db_pool_size)
    app = FastAPI(
        title="attrib",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=problem_responses(429, 503),
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.freeze_heap = freeze_heap
    app.state.store = store or LocalBlobStore(settings.resolved_storage_dir)
    app.state.queue = queue or CeleryQueue(settings.resolved_broker_url, settings.queue_prefix)
    if settings.fault_kill_before_publish:
        app.state.queue = KillBeforePublish(app.state.queue)
    app.state.metrics = create_metrics()
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    install_problem_handlers(app)
    add_problem_handler(app, ArtifactError, _on_artifact_error)
    for module in (models, datasets, fits, attributions, jobs, operations, pages):
        app.include_router(module.router)
    install_docs(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes, max_json_bytes=settings.max_json_bytes)
    app.add_middleware(
        AdmissionControl,
        max_in_flight=settings.max_in_flight,
        max_waiting=settings.max_waiting,
        wait_seconds=settings.admission_wait_seconds,
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def create_served_app() -> FastAPI:
    """The app as each process of `attrib serve --workers N` builds it (uvicorn's factory)."""
    return create_app(freeze_heap=True)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the API serves: its route threads sized from the settings, the job reaper (`service.reaper`) in
    a thread of its own, and (``freeze_heap``) the start-up heap frozen."""
    settings: Settings = app.state.settings
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    reaper = start_reaper(settings, app.state.queue)
    if app.state.freeze_heap:
        freeze_startup_heap()
    try:
        yield
    finally:
        if app.state.freeze_heap:
            gc.unfreeze()
        if reaper is not None:
            reaper.stop()


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the libraries' modules and their tables, torch's among them:
    about 470,000 objects) out of the cyclic garbage collector's view (`gc.freeze`). They live as long as the
    process; without this, each full collection walked them all: about 270 ms with the event loop stopped, on a
    2-core VM, which showed as rare 300 ms stalls and a p99 of 181-229 ms at 200 requests/s
    (benchmarks/results/results_latency_rate.md). Collections now walk only what requests allocate."""
    gc.collect()
    gc.freeze()


async def _on_artifact_error(request: Request, exc: ArtifactError) -> JSONResponse:
    from service.problems import FieldError

    errors = [FieldError(field=exc.field, message=exc.detail)] if exc.field else None
    return problem_response(
        422, exc.detail, kind="invalid-artifact", title="Invalid upload", instance=request.url.path, errors=errors
    )
