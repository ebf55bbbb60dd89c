"""Datasets: upload (safetensors, .npz without pickle, Parquet), read, list, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import JSONResponse
from sqlalchemy import select

from service.conversions import from_row
from service.dataset_uploads import stage_text_dataset, tokenize_options
from service.db.base import new_id, utcnow
from service.db.tables import Dataset, Model
from service.dependencies import MultipartBody, SessionDep, SettingsDep, StoreDep, TenantDep
from service.examples import MAX_EXAMPLES, dataset_examples
from service.idempotency import IdempotencyKey, remember, replay
from service.openapi import location_header, multipart_example
from service.ownership import owned
from service.pagination import PageTokenQuery, clamp_page_size, page_newest_first
from service.problems import invalid, problem_responses
from service.schemas.datasets import DatasetExamples, DatasetList, DatasetMetadata, DatasetOut
from service.uploads import check_storage_or_discard, commit_blob, parse_metadata, read_head, stage_upload
from worker.artifacts.datasets import describe, detect_format, read_dataset
from worker.artifacts.text_datasets import STORED_FORMAT, describe_text, field_names, is_text_dataset, read_text_dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=problem_responses(400, 401, 404, 422))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a dataset",
    responses={**problem_responses(413, 415), **location_header(201, "The dataset: `/v1/datasets/{id}`.")},
    openapi_extra=multipart_example(metadata='{"name": "digits-train"}', data="(.npz bytes)"),
    dependencies=[MultipartBody],
)
def upload_dataset(
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    metadata: Annotated[
        str,
        Form(
            min_length=2,
            max_length=1_000_000,
            description='JSON: `{"name": str}`; text datasets also '
            "`tokenize_with`, `max_length`, `truncation`, "
            "`padding`, `add_special_tokens`.",
        ),
    ],
    data: Annotated[
        UploadFile,
        File(
            description="safetensors, .npz (no pickle) or Parquet with `inputs`, "
            "`targets`, optional `ids`, `weight`, `task`, `split`; or a text "
            "dataset: `input_ids`, optional `attention_mask`, `labels`, "
            "`targets`, `ids` (safetensors or Parquet), or Parquet `text` / "
            "`prompt` + `completion` columns with `metadata.tokenize_with`."
        ),
    ],
    idempotency_key: IdempotencyKey,
) -> JSONResponse:
    """Arrays `inputs` and `targets`, optional `ids` (integers or strings, unique), `weight`, and `task`/`split`
    for meta-datasets, as safetensors, `.npz` (a pickle inside is refused, never loaded) or Parquet. The format is
    told from the file's first bytes. With an `Idempotency-Key`, a repeat returns the first answer."""
    meta = parse_metadata(metadata, DatasetMetadata)
    staged = stage_upload(store, data, limit=settings.max_upload_bytes, field="data")
    check_storage_or_discard(session, tenant.id, staged, settings.max_stored_bytes_per_tenant)
    fingerprint = {"metadata": meta.model_dump(), "data": staged.sha256}
    replayed = replay(session, tenant.id, idempotency_key, "POST /v1/datasets", fingerprint)
    if replayed is not None:
        staged.discard()
        return replayed
    try:
        fmt: str = detect_format(data.filename or "", read_head(staged))
        if is_text_dataset(field_names(staged.path, fmt)):
            text = read_text_dataset(
                staged.path,
                fmt,
                max_rows=settings.max_dataset_rows,
                max_bytes=settings.max_dataset_bytes,
                tokenize=tokenize_options(session, store, tenant.id, meta),
            )
            summary, ids_are_strings, fmt = describe_text(text), text.ids_are_strings, STORED_FORMAT
            stored = stage_text_dataset(store, text)
            staged.discard()
            staged = stored
        else:
            if meta.tokenize_with is not None:
                raise invalid(
                    "metadata.tokenize_with applies to text datasets (`text` or `prompt` + `completion` columns)",
                    "metadata.tokenize_with",
                )
            arrays = read_dataset(
                staged.path, fmt, max_rows=settings.max_dataset_rows, max_bytes=settings.max_dataset_bytes
            )
            summary, ids_are_strings = describe(arrays), arrays.ids_are_strings
    except BaseException:
        staged.discard()
        raise
    blob = commit_blob(session, staged)
    dataset = Dataset(
        id=new_id("ds"),
        tenant_id=tenant.id,
        name=meta.name,
        format=fmt,
        blob_sha256=blob.sha256,
        num_examples=summary["num_examples"],
        fields=summary["fields"],
        ids_are_strings=ids_are_strings,
        tokenizer_model_id=meta.tokenize_with if fmt == STORED_FORMAT else None,
        created_at=utcnow(),
    )
    session.add(dataset)
    session.flush()
    return remember(
        session,
        tenant.id,
        idempotency_key,
        "POST /v1/datasets",
        fingerprint,
        201,
        from_row(DatasetOut, dataset),
        {"Location": f"/v1/datasets/{dataset.id}"},
    )


@router.get("", summary="List datasets")
def list_datasets(
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    page_size: Annotated[int, Query(ge=1)] = 50,
    page_token: PageTokenQuery = None,
) -> DatasetList:
    """The tenant's datasets, newest first, cursor-paged (`next_page_token`)."""
    size = clamp_page_size(page_size, settings.max_page_size)
    query = select(Dataset).where(Dataset.tenant_id == tenant.id, Dataset.deleted_at.is_(None))
    rows, token = page_newest_first(session, query, Dataset, size, page_token)
    return DatasetList(datasets=[from_row(DatasetOut, row) for row in rows], next_page_token=token)


@router.get("/{dataset_id}", summary="Get a dataset")
def get_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> DatasetOut:
    """One dataset: its format, number of examples and the dtype and shape of each field."""
    return from_row(DatasetOut, owned(session, Dataset, tenant.id, dataset_id))


@router.get("/{dataset_id}/examples", summary="Get examples of a dataset")
def get_examples(
    dataset_id: str,
    tenant: TenantDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    ids: Annotated[
        list[str],
        Query(description=f"Example ids (the dataset's own ids); repeat the parameter, at most {MAX_EXAMPLES}."),
    ],
    model_id: Annotated[
        str | None,
        Query(
            max_length=64,
            description="Text datasets: decode with this `hf` model's uploaded tokenizer (default: the tokenizer "
            "that made the dataset, `metadata.tokenize_with`).",
        ),
    ] = None,
) -> DatasetExamples:
    """Some examples of the dataset by id (inputs and targets), e.g. to show the training examples that an
    attribution ranked. Text datasets give each example's token ids and labels (or class) and, when a tokenizer
    is known, its text and tokens decoded. An unknown id is a 404 naming it."""
    dataset = owned(session, Dataset, tenant.id, dataset_id)
    tokenizer_model = None
    if model_id is not None:
        tokenizer_model = owned(session, Model, tenant.id, model_id)
    elif dataset.tokenizer_model_id is not None:
        maker = session.get(Model, dataset.tokenizer_model_id)
        tokenizer_model = maker if maker is not None and maker.deleted_at is None else None
    return dataset_examples(store, dataset, ids, settings.max_dataset_rows, tokenizer_model)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a dataset")
def delete_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """The dataset is no longer listed nor usable in new fits and attributions."""
    owned(session, Dataset, tenant.id, dataset_id).deleted_at = utcnow()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
