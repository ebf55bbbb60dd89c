"""Text datasets at upload: the tokenizer of `metadata.tokenize_with`, and the canonical stored file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from service.db.tables import Model
from service.ownership import owned
from service.schemas.datasets import DatasetMetadata
from service.storage import BlobStore
from service.storage.base import StagedBlob
from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats import HF_FORMATS
from worker.artifacts.text_datasets import TextArrays, TokenizeOptions, write_stored
from worker.artifacts.tokenizer import load_tokenizer, special_token_id

PAD_TOKENS = ("pad_token", "eos_token", "unk_token")


def tokenize_options(
    session: Session, store: BlobStore, tenant_id: str, meta: DatasetMetadata
) -> TokenizeOptions | None:
    """How to tokenize text columns: the tokenizer uploaded with model ``tokenize_with``; None without it."""
    if meta.tokenize_with is None:
        return None
    model = owned(session, Model, tenant_id, meta.tokenize_with)
    files = model.architecture.get("files") or {}
    if model.format not in HF_FORMATS or "tokenizer" not in files:
        raise ArtifactError(
            f'model {model.id!r} has no tokenizer: upload it (format "hf") with a `tokenizer` part (tokenizer.json)',
            field="metadata.tokenize_with",
        )
    with store.local_path(files["tokenizer"]) as path:
        tokenizer = load_tokenizer(path)
    tokenizer_config = model.architecture.get("tokenizer_config")
    pad_id = special_token_id(tokenizer, tokenizer_config if isinstance(tokenizer_config, dict) else None, PAD_TOKENS)
    return TokenizeOptions(
        tokenizer=tokenizer,
        max_length=meta.max_length,
        padding=meta.padding,
        truncation=meta.truncation,
        pad_id=pad_id or 0,
        add_special_tokens=meta.add_special_tokens,
    )


def stage_text_dataset(store: BlobStore, dataset: TextArrays) -> StagedBlob:
    """The validated dataset in its stored form (Parquet), staged."""
    with tempfile.TemporaryDirectory(prefix="text-dataset-") as folder:
        path = Path(folder) / "dataset.parquet"
        write_stored(dataset, path)
        with open(path, "rb") as handle:
            return store.stage(handle, limit=1 << 62)
