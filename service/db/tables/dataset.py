from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, utcnow


class Dataset(Base):
    """An uploaded dataset: the original file in blob storage and what was found in it."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    num_examples: Mapped[int]
    fields: Mapped[dict[str, Any]]
    ids_are_strings: Mapped[bool] = mapped_column(default=False)
    # A text dataset tokenized at upload (metadata.tokenize_with): the model whose tokenizer made its token ids.
    tokenizer_model_id: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
