"""Curvature fits: queued like attributions, stored as safetensors, reusable by many attributions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.attribution_requests import check_inputs_fit, owned_checkpoints
from service.conversions import from_row
from service.db.base import new_id, utcnow
from service.db.tables import Dataset, Fit, Model
from service.dependencies import JsonBody, SessionDep, SettingsDep, TenantDep
from service.idempotency import IdempotencyKey, remember, replay
from service.jobs import create_job, enqueue_or_fail, job_status
from service.openapi import location_header
from service.ownership import owned
from service.problems import invalid, problem_responses
from service.schemas.fits import FitIn, FitOut
from service.schemas.options import FIT_STORED_FIELDS

router = APIRouter(prefix="/v1/fits", tags=["fits"], responses=problem_responses(400, 401, 404, 422))


@router.post(
    "",
    status_code=202,
    response_model=FitOut,
    summary="Queue a curvature fit",
    responses={**problem_responses(409, 413, 415), **location_header(202, "The fit's job: `/v1/jobs/{job_id}`.")},
    dependencies=[JsonBody],
)
def create_fit(
    body: FitIn,
    request: Request,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey,
) -> JSONResponse:
    """Queue a fit of the model's curvature (EK-FAC, K-FAC, diagonal or identity) on a dataset; many attributions
    reuse it via `fit_id`. Answers 202 with the fit and `Location: /v1/jobs/{job_id}`; poll the job."""
    replayed = replay(session, tenant.id, idempotency_key, "POST /v1/fits", body)
    if replayed is not None:
        return replayed
    model = owned(session, Model, tenant.id, body.model_id)
    dataset = owned(session, Dataset, tenant.id, body.dataset_id)
    check_inputs_fit(model, dataset, "body.dataset_id", settings.max_activation_bytes, body.batch_size)
    if body.layers is not None:
        unknown = [name for name in body.layers if name not in model.tracked_layers]
        if unknown:
            raise invalid(
                f"layers {unknown} are not trackable layers of the model ({model.tracked_layers})", "body.layers"
            )
    if body.checkpoint_ids:
        owned_checkpoints(session, model, body.checkpoint_ids)
    job = create_job(session, tenant.id, "fit", settings.max_active_jobs_per_tenant)
    options = body.model_dump(include=set(FIT_STORED_FIELDS))
    fit = Fit(
        id=new_id("fit"),
        tenant_id=tenant.id,
        job_id=job.id,
        model_id=model.id,
        dataset_id=dataset.id,
        strategy=body.strategy,
        options=options,
        damping=body.damping,
        checkpoint_ids=body.checkpoint_ids,
        created_at=utcnow(),
    )
    session.add(fit)
    session.flush()
    response = remember(
        session,
        tenant.id,
        idempotency_key,
        "POST /v1/fits",
        body,
        202,
        from_row(FitOut, fit, status="queued"),
        {"Location": f"/v1/jobs/{job.id}"},
    )
    session.commit()
    enqueue_or_fail(session, request.app.state.queue, job)
    return response


@router.get("/{fit_id}", summary="Get a fit")
def get_fit(fit_id: str, tenant: TenantDep, session: SessionDep) -> FitOut:
    """One fit, with the status of its job."""
    fit = owned(session, Fit, tenant.id, fit_id)
    return from_row(FitOut, fit, status=job_status(session, fit.job_id))
