"""`POST /v1/models`: the file parts staged, validated by the model format (worker.artifacts.formats), stored.

A refused upload leaves nothing: every staged part is discarded and the format's work folder removed. The
stored weights are one safetensors blob (shards are merged); other files a format keeps (a tokenizer) become
blobs whose sha256 are recorded under ``architecture["files"]``, next to the blobs of another model that the
upload builds on (a LoRA adapter's base weights and tokenizer), which are referred to, not copied.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import UploadFile
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import Model
from service.ownership import owned
from service.problems import ProblemError, not_found
from service.quotas import check_storage
from service.settings import Settings
from service.storage import BlobStore
from service.storage.base import StagedBlob
from service.uploads import commit_blob, stage_upload
from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats import BaseModelRef, ModelFormat, ModelUpload, StoredModel

SMALL_PART_BYTES = 16 * 1024 * 1024  # config.json, the shard index, tokenizer_config.json, adapter_config.json
TOKENIZER_PART_BYTES = 64 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
LARGE_PARTS = ("weights", "archive")


@dataclass
class StoredUpload:
    architecture: dict[str, Any]
    weights_sha256: str
    num_parameters: int
    tracked_layers: list[str]


def part_limit(part: str, settings: Settings) -> int:
    if part in LARGE_PARTS:
        return settings.max_upload_bytes
    return TOKENIZER_PART_BYTES if part == "tokenizer" else SMALL_PART_BYTES


def stage_parts(
    store: BlobStore, parts: dict[str, list[UploadFile]], settings: Settings
) -> dict[str, list[StagedBlob]]:
    """Every file part staged (pickles refused by name first); on any refusal nothing stays staged."""
    for part, uploads in parts.items():
        for upload in uploads:
            if part in LARGE_PARTS and (upload.filename or "").lower().endswith(PICKLE_SUFFIXES):
                raise ArtifactError(
                    f"the `{part}` file {upload.filename!r} is a pickle, which is never loaded: "
                    "upload safetensors (save_pretrained's default)",
                    field=part,
                )
    staged: dict[str, list[StagedBlob]] = {}
    try:
        for part, uploads in parts.items():
            staged[part] = [
                stage_upload(store, upload, limit=part_limit(part, settings), field=part) for upload in uploads
            ]
    except BaseException:
        discard_all(staged)
        raise
    return staged


def discard_all(staged: dict[str, list[StagedBlob]]) -> None:
    for blobs in staged.values():
        for blob in blobs:
            blob.discard()


def staged_size(staged: dict[str, list[StagedBlob]]) -> int:
    return sum(blob.size for blobs in staged.values() for blob in blobs)


def check_quota_or_discard(session: Session, tenant_id: str, staged: dict[str, list[StagedBlob]], quota: int) -> None:
    try:
        check_storage(session, tenant_id, staged_size(staged), quota)
    except ProblemError:
        discard_all(staged)
        raise


def fingerprint_files(staged: dict[str, list[StagedBlob]]) -> dict[str, Any]:
    """What identifies the upload's files for idempotency (the single `weights` part as before)."""
    if set(staged) == {"weights"} and len(staged["weights"]) == 1:
        return {"weights": staged["weights"][0].sha256}
    return {"files": {part: [blob.sha256 for blob in blobs] for part, blobs in sorted(staged.items())}}


def base_model(session: Session, tenant_id: str, base_model_id: str | None) -> Model | None:
    """The model an upload builds on (``metadata.base_model_id``): the tenant's own, not deleted, else a 404."""
    return None if base_model_id is None else owned(session, Model, tenant_id, base_model_id)


def lock_base_model(session: Session, base: Model) -> None:
    """Re-read the base row under a row lock right before its adapter is inserted (``FOR SHARE`` on PostgreSQL):
    a concurrent ``DELETE /v1/models/{base}`` either commits first (then this is a 404) or waits for this upload
    and then sees the new adapter (a 409), so no adapter is ever left on a deleted base."""
    session.refresh(base, with_for_update={"read": True})
    if base.deleted_at is not None:
        raise not_found("model", base.id)


def live_adapters(session: Session, tenant_id: str, base_id: str) -> list[str]:
    """The ids of the tenant's live `lora` models on the base ``base_id``, oldest first."""
    query = (
        select(Model.id)
        .where(
            Model.tenant_id == tenant_id,
            Model.format == "lora",
            Model.deleted_at.is_(None),
            Model.architecture["base_model_id"].as_string() == base_id,
        )
        .order_by(Model.created_at, Model.id)
    )
    return list(session.scalars(query))


def _base_ref(stack: ExitStack, store: BlobStore, base: Model) -> BaseModelRef:
    files = dict(base.architecture.get("files") or {})
    return BaseModelRef(
        model_id=base.id,
        format=base.format,
        weights_sha256=base.weights_sha256,
        files_sha256=files,
        stored=StoredModel(
            architecture=base.architecture,
            task=base.task,
            weights=stack.enter_context(store.local_path(base.weights_sha256)),
            files={name: stack.enter_context(store.local_path(sha256)) for name, sha256 in files.items()},
        ),
    )


def prepare_and_store(
    session: Session,
    store: BlobStore,
    fmt: ModelFormat,
    architecture: dict[str, Any],
    task: dict[str, Any],
    staged: dict[str, list[StagedBlob]],
    settings: Settings,
    base: Model | None = None,
) -> StoredUpload:
    """Validate with the format, then commit the weights and kept files as blobs; the rest is discarded."""
    by_path = {blob.path: blob for blobs in staged.values() for blob in blobs}
    try:
        with tempfile.TemporaryDirectory(prefix="model-upload-") as work, ExitStack() as stack:
            upload = ModelUpload(
                architecture=architecture,
                task=task,
                files={part: [blob.path for blob in blobs] for part, blobs in staged.items()},
                max_parameters=settings.max_parameters,
                max_unpacked_bytes=settings.max_upload_bytes,
                base=None if base is None else _base_ref(stack, store, base),
            )
            prepared = fmt.prepare(upload, Path(work))
            weights = _commit_file(session, store, prepared.weights, by_path)
            files = {name: _commit_file(session, store, path, by_path) for name, path in prepared.extra_files.items()}
    finally:
        for blob in by_path.values():
            blob.discard()
    stored_architecture = dict(prepared.architecture)
    files = {**prepared.linked_files, **files}
    if files:
        stored_architecture["files"] = files
    return StoredUpload(
        architecture=stored_architecture,
        weights_sha256=weights,
        num_parameters=prepared.num_parameters,
        tracked_layers=prepared.tracked_layers,
    )


def _commit_file(session: Session, store: BlobStore, path: Path, by_path: dict[Path, StagedBlob]) -> str:
    staged = by_path.pop(path, None)
    if staged is None:
        with open(path, "rb") as handle:
            staged = store.stage(handle, limit=1 << 62)
    return commit_blob(session, staged).sha256
