"""FastAPI dependencies: settings, a database session per request, blob storage, the caller's tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from anyio import CapacityLimiter, to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth import Caller, hash_key, known_caller, tenant_for_key
from service.db.session import get_sessionmaker, session_scope
from service.problems import ProblemError
from service.settings import Settings
from service.storage import BlobStore


async def get_app_settings(request: Request) -> Settings:  # async: no thread hop for a field read
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, committed before the response is sent (``scope="function"`` below), so a
    client that has its answer can rely on the write being visible to its next request.

    Async, so that it costs no thread hop when it does no I/O: making a session touches no connection, and a
    route that ended its own transaction (a read-only page calls ``session.close()``) leaves nothing to commit.
    Only a session still in a transaction is committed (or rolled back) on a worker thread, outside the route
    threads' limit (as FastAPI does for its own exits): when every route thread waits for a lock that this
    commit releases (SQLite's writer lock, with concurrent idempotent retries), the commit must still run."""
    session = get_sessionmaker(request.app.state.settings.resolved_database_url)()
    try:
        yield session
    except BaseException:
        await to_thread.run_sync(_roll_back_and_close, session, limiter=CapacityLimiter(1))
        raise
    if session.in_transaction():
        await to_thread.run_sync(_commit_and_close, session, limiter=CapacityLimiter(1))
    else:
        session.close()


def _commit_and_close(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _roll_back_and_close(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


async def get_store(request: Request) -> BlobStore:
    store: BlobStore = request.app.state.store
    return store


bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer atk_...`.")


async def get_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    """The caller's tenant: from the key cache on the event loop, or looked up on a worker thread."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(
            401, "an API key is required: send `Authorization: Bearer <key>`", kind="unauthenticated", headers=challenge
        )
    tenant = known_caller(credentials.credentials)
    if tenant is None:
        tenant = await run_in_threadpool(_look_up_tenant, request, credentials.credentials)
    if tenant is None:
        raise ProblemError(401, "the API key is not valid", kind="unauthenticated", headers=challenge)
    request.app.state.rate_limiter.check(hash_key(credentials.credentials))
    return tenant


def _look_up_tenant(request: Request, secret: str) -> Caller | None:
    with session_scope(request.app.state.settings.resolved_database_url) as session:
        return tenant_for_key(session, secret)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[BlobStore, Depends(get_store)]
TenantDep = Annotated[Caller, Depends(get_tenant)]


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(request: Request) -> None:
    """415 for a JSON route called with another body type."""
    kind = _content_type(request)
    if kind != "application/json" and not kind.endswith("+json"):
        raise ProblemError(
            415, f"send the body as application/json, not {kind or 'no content type'}", kind="unsupported-media-type"
        )


def require_multipart(request: Request) -> None:
    """415 for an upload route called with another body type."""
    kind = _content_type(request)
    if kind != "multipart/form-data":
        raise ProblemError(
            415,
            f"upload as multipart/form-data (a `metadata` JSON part and a file part), not {kind or 'no content type'}",
            kind="unsupported-media-type",
        )


JsonBody = Depends(require_json)
MultipartBody = Depends(require_multipart)
