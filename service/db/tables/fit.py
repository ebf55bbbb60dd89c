from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, utcnow


class Fit(Base):
    """A curvature fit (one per model of the fit) stored as safetensors blobs, reusable by attributions."""

    __tablename__ = "fits"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    strategy: Mapped[str] = mapped_column(String(16))
    options: Mapped[dict[str, Any]]
    damping: Mapped[float | None] = mapped_column(default=None)
    checkpoint_ids: Mapped[list[str] | None] = mapped_column(default=None)
    artifact_sha256: Mapped[str | None] = mapped_column(ForeignKey("blobs.sha256"), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
