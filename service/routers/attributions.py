"""Attributions: submit (202 + job), read, ranked results with cursor paging, export, edit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from service import export
from service.attribution_requests import check_attribution
from service.conversions import from_row
from service.db.base import new_id, utcnow
from service.db.session import read_without_transaction, session_scope
from service.db.tables import Attribution
from service.dependencies import JsonBody, SessionDep, SettingsDep, StoreDep, TenantDep
from service.editing import submit_edit
from service.idempotency import IdempotencyKey, remember, replay
from service.jobs import create_job, enqueue_or_fail, job_status
from service.openapi import json_body_example, location_header
from service.ownership import owned
from service.pagination import PageTokenQuery, RankCursor, clamp_page_size, decode_token, encode_token
from service.problems import ProblemError, problem_responses
from service.results import (
    all_results,
    has_query,
    id_types,
    known_finished,
    page_json,
    page_of_results,
    remember_finished,
    row_out,
)
from service.schemas.attributions import (
    AttributionIn,
    AttributionOut,
    EditAccepted,
    EditIn,
    ResultIdTypes,
    ResultRow,
    ResultsPage,
)
from service.schemas.diagnostics import stored_attribution_diagnostics

router = APIRouter(prefix="/v1/attributions", tags=["attributions"], responses=problem_responses(400, 401, 404, 422))


QueryTokenQuery = Annotated[
    int | None,
    Query(
        ge=0,
        le=2**31 - 1,
        description="`per_token` attributions: keep the rows of this token position (`query_token`) only.",
    ),
]


def attribution_view(attribution: Attribution, status: str) -> AttributionOut:
    """The stored attribution (`from_attributes`) with its job's status and where its results are."""
    return from_row(
        AttributionOut,
        attribution,
        status=status,
        results_url=f"/v1/attributions/{attribution.id}/results",
        diagnostics=stored_attribution_diagnostics(attribution.method, attribution.diagnostics),
    )


ATTRIBUTION_REQUEST_EXAMPLE = {
    "model_id": "mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
    "train_dataset_id": "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
    "query_dataset_id": "ds_8a9b0c1d2e3f4a5b6c7d8e9f",
    "method": "influence",
    "mode": "pairwise",
    "top_k": 10,
    "options": {"strategy": "ekfac"},
}


@router.post(
    "",
    status_code=202,
    response_model=AttributionOut,
    summary="Queue an attribution",
    responses={
        **problem_responses(409, 413, 415),
        **location_header(202, "The attribution's job: `/v1/jobs/{job_id}`."),
    },
    openapi_extra=json_body_example(ATTRIBUTION_REQUEST_EXAMPLE),
    dependencies=[JsonBody],
)
def create_attribution(
    body: AttributionIn,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey,
) -> JSONResponse:
    """Queue an attribution of the queries' behaviour to the training examples with one method (`method`, and
    its `options`: unknown options are a 422). Answers 202 with the attribution and
    `Location: /v1/jobs/{job_id}`; poll the job, then page the results. Scores are 1/N-free: positive = the
    training example helps the query (removing it would raise the query's loss), negative = it hurts; in `self`
    mode, higher = more unusual."""
    replayed = replay(session, tenant.id, idempotency_key, "POST /v1/attributions", body)
    if replayed is not None:
        return replayed
    asked = body.root  # the request model of the method it names, with its typed options
    checked = check_attribution(session, tenant.id, asked, settings)
    job = create_job(session, tenant.id, "attribution", settings.max_active_jobs_per_tenant)
    attribution = Attribution(
        id=new_id("attr"),
        tenant_id=tenant.id,
        job_id=job.id,
        method=checked.method.name,
        mode=asked.mode,
        measurement=asked.measurement,
        model_ids=[m.id for m in checked.models],
        train_dataset_id=checked.train.id,
        query_dataset_id=checked.query.id if checked.query else None,
        fit_id=asked.fit_id,
        top_k=asked.top_k,
        per_token=asked.per_token,
        options=checked.options.model_dump(),
        created_at=utcnow(),
    )
    session.add(attribution)
    session.flush()
    response = remember(
        session,
        tenant.id,
        idempotency_key,
        "POST /v1/attributions",
        body,
        202,
        attribution_view(attribution, "queued"),
        {"Location": f"/v1/jobs/{job.id}"},
    )
    session.commit()
    enqueue_or_fail(session, request.app.state.queue, job)
    return response


@router.get("/{attribution_id}", summary="Get an attribution")
def get_attribution(attribution_id: str, tenant: TenantDep, session: SessionDep) -> AttributionOut:
    """One attribution with the status of its job, its options as resolved, its diagnostics and row count."""
    attribution = owned(session, Attribution, tenant.id, attribution_id)
    return attribution_view(attribution, job_status(session, attribution.job_id))


def finished_attribution(session: SessionDep, tenant_id: str, attribution_id: str) -> Attribution:
    attribution = owned(session, Attribution, tenant_id, attribution_id)
    state = job_status(session, attribution.job_id)
    if state != "succeeded":
        raise ProblemError(
            409, f"attribution {attribution_id!r} has no results: its job is {state}", kind="results-not-ready"
        )
    return attribution


@router.get(
    "/{attribution_id}/results",
    response_model=ResultsPage,
    responses=problem_responses(409),
    summary="Page through ranked results",
)
def get_results(
    attribution_id: str,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    query_id: str | None = None,
    query_token: QueryTokenQuery = None,
    direction: Literal["positive", "negative"] = "positive",
    page_size: Annotated[int, Query(ge=1)] = 100,
    page_token: PageTokenQuery = None,
) -> Response:
    """Ranked rows of one direction ordered by query, then rank (1 = strongest) within (query, direction),
    cursor-paged (`next_page_token`); `query_id` keeps one query, `query_token` one token position of each query
    (`per_token` attributions: each token is ranked on its own, in position order). A 409 until the job has
    succeeded."""
    read_without_transaction(session)  # every read below is of rows that no longer change
    types = known_finished(attribution_id, tenant.id)
    if types is None:
        attribution = finished_attribution(session, tenant.id, attribution_id)
        types = id_types(session, attribution)
        remember_finished(attribution, types)
    after = decode_token(page_token, RankCursor) if page_token else None
    size = clamp_page_size(page_size, settings.max_page_size)
    rows, last = page_of_results(session, attribution_id, direction, query_id, after, size, query_token)
    filtered = query_id is not None or query_token is not None
    if not rows and filtered and not has_query(session, attribution_id, query_id, query_token):
        asked = " and ".join(
            f"{name} {value!r}"
            for name, value in (("query_id", query_id), ("query_token", query_token))
            if value is not None
        )
        raise ProblemError(404, f"attribution {attribution_id!r} has no row with {asked}", kind="not-found")
    session.close()  # read only: its connection goes back now, on this thread (see dependencies.get_session)
    token = encode_token(last) if last else None
    return Response(page_json(rows, types, token), media_type="application/json")  # ResultsPage, documented above


def exported_rows(
    database_url: str, attribution_id: str, types: ResultIdTypes, query_token: int | None = None
) -> Iterator[ResultRow]:
    """Rows read in their own session, which lives as long as the streamed response."""
    with session_scope(database_url) as session:
        for row in all_results(session, attribution_id, query_token):
            yield row_out(row, types)


EXPORT_MEDIA = {"csv": "text/csv", "ndjson": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}
EXPORT_CONTENT = {
    "text/csv": {
        "schema": {"type": "string"},
        "example": (
            "query_id,direction,rank,train_id,score,task,split,query_token,query_token_text\r\n"
            "7,positive,1,412,3.25,,,,\r\n7,negative,1,90,-2.0,,,,\r\n"
        ),
    },
    "application/x-ndjson": {
        "schema": {"type": "string"},
        "example": (
            '{"query_id": 7, "direction": "positive", "rank": 1, "train_id": 412, "score": 3.25, "task": null, '
            '"split": null, "query_token": null, "query_token_text": null}\n'
        ),
    },
    "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
}


@router.get(
    "/{attribution_id}/results/export",
    response_model=None,
    response_class=StreamingResponse,  # no default media type: the 200 has only the export formats' own
    summary="Export every result row",
    responses={
        **problem_responses(409),
        200: {
            "content": EXPORT_CONTENT,
            "description": "Every result row, as an attachment `{attribution_id}.{format}`.",
        },
    },
)
def export_results(
    attribution_id: str,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    format: Literal["csv", "ndjson", "parquet"] = "csv",
    query_token: QueryTokenQuery = None,
) -> StreamingResponse | FileResponse:
    """Every row (both directions, every query) in one download: `csv` (a header line, empty cells for nulls),
    `ndjson` (one JSON object per line) or `parquet` (ids typed as in the datasets); `query_token` keeps one token
    position (`per_token` attributions). A 409 until the job has succeeded."""
    attribution = finished_attribution(session, tenant.id, attribution_id)
    types = id_types(session, attribution)
    rows = exported_rows(settings.resolved_database_url, attribution.id, types, query_token)
    filename = f"{attribution.id}.{format}"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if format == "parquet":
        path = export.parquet_file(rows, (types.query_ids_are_strings, types.train_ids_are_strings))
        return FileResponse(
            path, media_type=EXPORT_MEDIA[format], headers=headers, background=BackgroundTask(os.unlink, path)
        )
    chunks = export.csv_chunks(rows) if format == "csv" else export.ndjson_chunks(rows)
    return StreamingResponse(chunks, media_type=EXPORT_MEDIA[format], headers=headers)


@router.post(
    "/{attribution_id}/edit",
    status_code=202,
    response_model=EditAccepted,
    name="edit_attribution",
    summary="Queue an edit: the model retrained without some training examples",
    responses={**problem_responses(409, 413, 415), **location_header(202, "The edit's job: `/v1/jobs/{job_id}`.")},
    dependencies=[JsonBody],
)
def edit(
    attribution_id: str,
    body: EditIn,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey,
) -> JSONResponse:
    """Queue an edit: a new model whose weights estimate the model retrained without the given training
    examples (or tasks). Answers 202 with the model id it will have and its job (`Location`); the model exists
    (`GET /v1/models/{model_id}`) once the job succeeds, with the edit's diagnostics. `options.estimator` says
    how the retrain is estimated (default `newton`)."""
    route = f"POST /v1/attributions/{attribution_id}/edit"
    replayed = replay(session, tenant.id, idempotency_key, route, body)
    if replayed is not None:
        return replayed
    attribution = finished_attribution(session, tenant.id, attribution_id)
    edit_row, job = submit_edit(session, store, attribution, body, settings.max_active_jobs_per_tenant)
    response = remember(
        session,
        tenant.id,
        idempotency_key,
        route,
        body,
        202,
        EditAccepted(model_id=edit_row.model_id, job_id=job.id),
        {"Location": f"/v1/jobs/{job.id}"},
    )
    session.commit()
    enqueue_or_fail(session, request.app.state.queue, job)
    return response
