"""Multipart uploads: the JSON `metadata` part, and file parts staged into blob storage with a size limit."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import UploadFile
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from service.db.tables import Blob
from service.limits import check_json_depth
from service.problems import FieldError, ProblemError
from service.quotas import check_storage
from service.storage import BlobStore, BlobTooLarge, StoredBlob
from service.storage.base import StagedBlob

MetadataT = TypeVar("MetadataT", bound=BaseModel)


def parse_metadata(raw: str, schema: type[MetadataT]) -> MetadataT:
    check_json_depth(raw, "metadata")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProblemError(
            422,
            f"the metadata part is not valid JSON: {exc}",
            kind="invalid-input",
            title="Invalid input",
            errors=[FieldError(field="metadata", message=str(exc))],
        ) from exc
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = [
            FieldError(field=".".join(["metadata", *(str(p) for p in e["loc"])]), message=e["msg"])
            for e in exc.errors()
        ]
        summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
        raise ProblemError(
            422, f"the metadata is invalid: {summary}", kind="invalid-input", title="Invalid input", errors=errors
        ) from exc


def stage_upload(store: BlobStore, upload: UploadFile, *, limit: int, field: str) -> StagedBlob:
    try:
        return store.stage(upload.file, limit=limit)
    except BlobTooLarge as exc:
        raise ProblemError(
            413, f"the `{field}` file is larger than the limit of {limit} bytes", kind="payload-too-large"
        ) from exc


def check_storage_or_discard(session: Session, tenant_id: str, staged: StagedBlob, quota: int) -> None:
    """The tenant's storage quota, checked once the upload's size is known; a refused upload leaves nothing."""
    try:
        check_storage(session, tenant_id, staged.size, quota)
    except ProblemError:
        staged.discard()
        raise


def read_head(staged: StagedBlob, size: int = 16) -> bytes:
    with open(staged.path, "rb") as handle:
        return handle.read(size)


def commit_blob(session: Session, staged: StagedBlob) -> StoredBlob:
    """Move a validated staged file into storage and record it (once per content)."""
    stored = staged.commit()
    if session.get(Blob, stored.sha256) is None:
        session.add(Blob(sha256=stored.sha256, size=stored.size))
        session.flush()
    return stored
