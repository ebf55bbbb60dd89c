"""Models and their checkpoints: upload (validated strictly), read, list, delete, download weights."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from service import artifacts
from service.conversions import from_row
from service.db.base import new_id, utcnow
from service.db.tables import Checkpoint, Edit, Model
from service.dependencies import MultipartBody, SessionDep, SettingsDep, StoreDep, TenantDep
from service.idempotency import IdempotencyKey, remember, replay
from service.model_uploads import (
    base_model,
    check_quota_or_discard,
    discard_all,
    fingerprint_files,
    live_adapters,
    lock_base_model,
    prepare_and_store,
    stage_parts,
)
from service.openapi import location_header, multipart_example
from service.ownership import owned
from service.pagination import (
    CheckpointCursor,
    PageTokenQuery,
    clamp_page_size,
    decode_token,
    encode_token,
    page_newest_first,
)
from service.problems import ProblemError, invalid, problem_responses
from service.schemas.models import (
    CheckpointList,
    CheckpointMetadata,
    CheckpointOut,
    ModelFormats,
    ModelList,
    ModelMetadata,
    ModelOut,
)
from service.uploads import check_storage_or_discard, commit_blob, parse_metadata, stage_upload
from worker.artifacts.formats import FORMATS, NOT_SUPPORTED_YET, model_format

router = APIRouter(prefix="/v1/models", tags=["models"], responses=problem_responses(400, 401, 404, 422))

MODEL_METADATA_EXAMPLE = (
    '{"name": "digits-mlp", "format": "spec", "architecture": {"type": "sequential", "layers": '
    '[{"type": "linear", "in_features": 64, "out_features": 128}, {"type": "relu"}, '
    '{"type": "linear", "in_features": 128, "out_features": 10}]}, '
    '"task": {"loss": "cross_entropy"}}'
)
METADATA_DOC = (
    'JSON: `{"name", "format": "spec" | "hf" | "lora", "architecture": {...} (spec only), '
    '"task": {"loss": ..., "head": ... (hf classifiers)}, "base_model_id": ... (lora only)}`. See '
    "`GET /v1/models/formats`."
)
WEIGHTS_DOC = (
    "safetensors of the model's state_dict; `hf`: repeat the part for shards (with `weights_index`); "
    "`lora`: adapter_model.safetensors. Pickles (.bin, .pt) are refused."
)
ARCHIVE_DOC = (
    "`hf`, `lora`: instead of the file parts, a .tar, .tar.gz or .zip of a save_pretrained folder (no links, "
    "absolute paths or `..`)."
)


def model_out(model: Model, edit_diagnostics: dict[str, Any] | None = None) -> ModelOut:
    """The stored model (`from_attributes`) with the diagnostics of the edit that made it, if any."""
    base_model_id = model.architecture.get("base_model_id") if model.format == "lora" else None
    return from_row(ModelOut, model, edit_diagnostics=edit_diagnostics, base_model_id=base_model_id)


def edit_diagnostics(session: Session, model_ids: list[str]) -> dict[str, dict[str, Any] | None]:
    """The diagnostics of the edits that made these models (models made by `/edit` only)."""
    if not model_ids:
        return {}
    rows = session.execute(select(Edit.model_id, Edit.diagnostics).where(Edit.model_id.in_(model_ids)))
    return {model_id: diagnostics for model_id, diagnostics in rows}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    summary="Upload a model",
    responses={**problem_responses(413, 415), **location_header(201, "The model: `/v1/models/{id}`.")},
    openapi_extra=multipart_example(metadata=MODEL_METADATA_EXAMPLE, weights="(safetensors bytes)"),
    dependencies=[MultipartBody],
)
def upload_model(
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    metadata: Annotated[str, Form(min_length=2, max_length=1_000_000, description=METADATA_DOC)],
    idempotency_key: IdempotencyKey,
    weights: Annotated[list[UploadFile] | None, File(description=WEIGHTS_DOC)] = None,
    config: Annotated[UploadFile | None, File(description="`hf`: config.json.")] = None,
    weights_index: Annotated[UploadFile | None, File(description="`hf` shards: model.safetensors.index.json.")] = None,
    tokenizer: Annotated[UploadFile | None, File(description="`hf`: tokenizer.json (optional).")] = None,
    tokenizer_config: Annotated[UploadFile | None, File(description="`hf`: tokenizer_config.json (optional).")] = None,
    archive: Annotated[UploadFile | None, File(description=ARCHIVE_DOC)] = None,
    adapter_config: Annotated[UploadFile | None, File(description="`lora`: adapter_config.json.")] = None,
) -> JSONResponse:
    """`spec`: a declarative `torch.nn.Sequential` (`metadata`) and the safetensors of its state_dict (`weights`).
    `hf`: a Hugging Face transformers model (`config`, `weights`, optional tokenizer parts, or one `archive`; see
    `GET /v1/models/formats`). `lora`: a peft LoRA adapter (`adapter_config`, `weights`, or one `archive`) on
    the stored `hf` model `metadata.base_model_id`. Everything is validated strictly (never unpickled, no remote code): weights that are
    truncated, hold NaN or do not fit the architecture are a 422 that names the problem, and nothing is stored.
    With an `Idempotency-Key`, a repeat returns the first answer."""
    meta = parse_metadata(metadata, ModelMetadata)
    fmt = model_format(meta.format)
    if meta.base_model_id is not None and meta.format != "lora":
        raise invalid('metadata.base_model_id applies to format "lora"', "metadata.base_model_id")
    base = base_model(session, tenant.id, meta.base_model_id)
    given = {
        "weights": weights or [],
        "config": [config] if config else [],
        "weights_index": [weights_index] if weights_index else [],
        "tokenizer": [tokenizer] if tokenizer else [],
        "tokenizer_config": [tokenizer_config] if tokenizer_config else [],
        "archive": [archive] if archive else [],
        "adapter_config": [adapter_config] if adapter_config else [],
    }
    parts = {name: files for name, files in given.items() if files}
    staged = stage_parts(store, parts, settings)
    check_quota_or_discard(session, tenant.id, staged, settings.max_stored_bytes_per_tenant)
    fingerprint = {"metadata": meta.model_dump(), **fingerprint_files(staged)}
    replayed = replay(session, tenant.id, idempotency_key, "POST /v1/models", fingerprint)
    if replayed is not None:
        discard_all(staged)
        return replayed
    task = meta.task.model_dump(exclude_none=True)
    stored = prepare_and_store(session, store, fmt, meta.architecture, task, staged, settings, base)
    if base is not None:
        lock_base_model(session, base)
    model = Model(
        id=new_id("mdl"),
        tenant_id=tenant.id,
        name=meta.name,
        format=meta.format,
        architecture=stored.architecture,
        task=task,
        weights_sha256=stored.weights_sha256,
        num_parameters=stored.num_parameters,
        tracked_layers=stored.tracked_layers,
        created_at=utcnow(),
    )
    session.add(model)
    session.flush()
    return remember(
        session,
        tenant.id,
        idempotency_key,
        "POST /v1/models",
        fingerprint,
        201,
        model_out(model),
        {"Location": f"/v1/models/{model.id}"},
    )


@router.get("/formats", summary="List the model formats")
def list_formats() -> ModelFormats:
    """The model formats `POST /v1/models` accepts: their parts, losses, and for `hf` the allow-listed
    `model_type`s and heads."""
    return ModelFormats(
        formats=[model_format(name).describe() for name in FORMATS], not_supported_yet=list(NOT_SUPPORTED_YET)
    )


@router.get("", summary="List models")
def list_models(
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    page_size: Annotated[int, Query(ge=1)] = 50,
    page_token: PageTokenQuery = None,
) -> ModelList:
    """The tenant's models, newest first, cursor-paged (`next_page_token`)."""
    size = clamp_page_size(page_size, settings.max_page_size)
    query = select(Model).where(Model.tenant_id == tenant.id, Model.deleted_at.is_(None))
    rows, token = page_newest_first(session, query, Model, size, page_token)
    diagnostics = edit_diagnostics(session, [row.id for row in rows if row.source_attribution_id])
    return ModelList(models=[model_out(row, diagnostics.get(row.id)) for row in rows], next_page_token=token)


@router.get("/{model_id}", summary="Get a model")
def get_model(model_id: str, tenant: TenantDep, session: SessionDep) -> ModelOut:
    """One model; models made by an edit carry the edit's diagnostics."""
    model = owned(session, Model, tenant.id, model_id)
    return model_out(
        model, edit_diagnostics(session, [model.id]).get(model.id) if model.source_attribution_id else None
    )


ADAPTERS_NAMED = 20  # a 409 names at most this many adapters of the base


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a model",
    responses=problem_responses(409),
)
def delete_model(model_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """The model is no longer listed nor usable in new fits and attributions. A `hf` model that live `lora`
    models are built on is not deleted: a 409 names them (delete them first)."""
    model = owned(session, Model, tenant.id, model_id)
    session.refresh(model, with_for_update=True)  # an adapter upload on this base waits, then sees it deleted
    adapters = live_adapters(session, tenant.id, model.id)
    if adapters:
        named = ", ".join(repr(a) for a in adapters[:ADAPTERS_NAMED])
        more = f" and {len(adapters) - ADAPTERS_NAMED} more" if len(adapters) > ADAPTERS_NAMED else ""
        raise ProblemError(
            409,
            f"model {model.id!r} is the base of {len(adapters)} LoRA model(s): {named}{more}; delete them first",
            kind="conflict",
        )
    model.deleted_at = utcnow()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{model_id}/weights",
    response_class=FileResponse,
    summary="Download a model's weights",
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The safetensors file of the model's state_dict.",
        }
    },
)
def download_weights(model_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep) -> FileResponse:
    """The weights as uploaded, or as an edit made them: a safetensors file (`{model_id}.safetensors`)."""
    model = owned(session, Model, tenant.id, model_id)
    with store.local_path(model.weights_sha256) as path:
        return FileResponse(path, media_type="application/octet-stream", filename=f"{model.id}.safetensors")


@router.post(
    "/{model_id}/checkpoints",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a checkpoint",
    responses=problem_responses(409, 413, 415),
    dependencies=[MultipartBody],
    openapi_extra=multipart_example(
        metadata='{"step": 500, "learning_rate": 0.05, "momentum": 0.9}', weights="(safetensors bytes)"
    ),
)
def upload_checkpoint(
    model_id: str,
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    metadata: Annotated[
        str,
        Form(
            min_length=2,
            max_length=1_000_000,
            description='JSON: `{"step", "learning_rate", "stage", "momentum", "optimizer"}`.',
        ),
    ],
    weights: Annotated[UploadFile, File(description="safetensors of the model's state_dict at this step.")],
) -> CheckpointOut:
    """A training checkpoint of the model (for SOURCE and TracInCP): the state_dict at a step of its training,
    with that step's learning rate, momentum, optimizer and stage (for a `lora` model: the adapter weights). A second checkpoint at the same (stage, step)
    is a 409."""
    model = owned(session, Model, tenant.id, model_id)
    meta = parse_metadata(metadata, CheckpointMetadata)
    artifacts.check_checkpoint_is_new(session, model.id, meta.step, meta.stage)
    staged = stage_upload(store, weights, limit=settings.max_upload_bytes, field="weights")
    check_storage_or_discard(session, tenant.id, staged, settings.max_stored_bytes_per_tenant)
    try:
        model_format(model.format).check_weights(model.architecture, model.task, staged.path)
    except BaseException:
        staged.discard()
        raise
    blob = commit_blob(session, staged)
    checkpoint = Checkpoint(
        id=new_id("ckpt"),
        model_id=model.id,
        step=meta.step,
        learning_rate=meta.learning_rate,
        momentum=meta.momentum,
        stage=meta.stage,
        optimizer=meta.optimizer,
        weights_sha256=blob.sha256,
        created_at=utcnow(),
    )
    session.add(checkpoint)
    session.flush()
    return from_row(CheckpointOut, checkpoint)


@router.get("/{model_id}/checkpoints", summary="List a model's checkpoints")
def list_checkpoints(
    model_id: str,
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    page_size: Annotated[int, Query(ge=1)] = 100,
    page_token: PageTokenQuery = None,
) -> CheckpointList:
    """The model's checkpoints by (stage, step), cursor-paged (`next_page_token`)."""
    model = owned(session, Model, tenant.id, model_id)
    size = clamp_page_size(page_size, settings.max_page_size)
    query = select(Checkpoint).where(Checkpoint.model_id == model.id)
    if page_token:
        after = decode_token(page_token, CheckpointCursor)
        query = query.where(tuple_(Checkpoint.stage, Checkpoint.step, Checkpoint.id) > tuple(after))
    order = (Checkpoint.stage, Checkpoint.step, Checkpoint.id)
    rows = list(session.scalars(query.order_by(*order).limit(size + 1)))
    last = rows[size - 1] if len(rows) > size else None
    token = encode_token(CheckpointCursor(last.stage, last.step, last.id)) if last else None
    return CheckpointList(checkpoints=[from_row(CheckpointOut, c) for c in rows[:size]], next_page_token=token)
