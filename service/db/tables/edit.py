from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, utcnow


class Edit(Base):
    """A queued edit of an attribution's model: what to remove, how, and the id its model gets once the job
    succeeds (the ``models`` row is written in the job's final transaction, never before)."""

    __tablename__ = "edits"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    attribution_id: Mapped[str] = mapped_column(ForeignKey("attributions.id"))
    model_id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    remove: Mapped[list[Any]] = mapped_column(JSON)
    options: Mapped[dict[str, Any]]
    diagnostics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
