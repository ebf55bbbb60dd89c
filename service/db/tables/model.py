from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, utcnow


class Model(Base):
    """An uploaded (or edited) model: architecture, task and the sha256 of its weights."""

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    architecture: Mapped[dict[str, Any]]
    task: Mapped[dict[str, Any]]
    weights_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    tracked_layers: Mapped[list[str]]
    source_attribution_id: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
