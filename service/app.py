"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from service.limits import BodySizeLimit, BodyTooLarge
from service.metrics import MetricsMiddleware, create_metrics
from service.problems import install_problem_handlers, problem_response
from service.queue import CeleryQueue, JobQueue
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
    settings: Settings | None = None, *, queue: JobQueue | None = None, store: BlobStore | None = None
) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="attrib", version="0.1.0", description=DESCRIPTION, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.store = store or LocalBlobStore(settings.resolved_storage_dir)
    app.state.queue = queue or CeleryQueue(settings.resolved_broker_url)
    app.state.metrics = create_metrics()
    install_problem_handlers(app)
    app.add_exception_handler(ArtifactError, _on_artifact_error)  # type: ignore[arg-type]
    app.add_exception_handler(BodyTooLarge, _on_body_too_large)  # type: ignore[arg-type]
    for module in (models, datasets, fits, attributions, jobs, operations, pages):
        app.include_router(module.router)
    install_docs(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


async def _on_artifact_error(request, exc: ArtifactError):  # type: ignore[no-untyped-def]
    from service.problems import FieldError

    errors = [FieldError(field=exc.field, message=exc.detail)] if exc.field else None
    return problem_response(422, exc.detail, kind="invalid-artifact", title="Invalid upload",
                            instance=request.url.path, errors=errors)


async def _on_body_too_large(request, exc: BodyTooLarge):  # type: ignore[no-untyped-def]
    return problem_response(413, str(exc), kind="payload-too-large", title="Content Too Large",
                            instance=request.url.path)
